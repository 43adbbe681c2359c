"""Faults (#11.2, #11.3): a node that fails for a reason that says nothing about its input — its
encoder killed by a signal — is run again a bounded number of times, every attempt billed once;
a deterministic failure fails at once; starting a cluster is bounded in time and a start that
fails or runs out of time is one line, with no process of ours left behind.

The encoder is disturbed for real: the render's ``ffmpeg=`` is a small script in tmp_path that
SIGKILLs itself (on its first invocation only, or always) and otherwise exec's the real ffmpeg."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import imageio_ffmpeg
import pytest

from pipeline.calibration import Calibration
from pipeline.config import resolve_profile
from pipeline.dag import RETRIES
from pipeline.ledger import FAILED, episode_ledger
from pipeline.plan import make_plan
from pipeline.render import render
from pipeline.store import open_store
from pipeline.store.lease import current
from stages.records import NodeError
from stages.script import load_episode

from .conftest import REPO

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
SHOTLIST = REPO / "examples" / "shotlist.yaml"


def plan_for(prices):
    episode = load_episode(SHOTLIST)
    return make_plan(episode, resolve_profile("draft"), prices=prices,
                     calibration=Calibration.load(REPO / "cluster" / "calibration.csv"),
                     script_sha256=hashlib.sha256(episode.model_dump_json().encode()).hexdigest())


def wrapper(tmp_path, mode: str) -> str:
    """An ``ffmpeg`` that logs each invocation, then: ``kill-once`` SIGKILLs itself the first time
    (a marker directory says it did), ``kill-always`` every time, ``reject`` hands ffmpeg an option
    it refuses (ffmpeg exits 1: a deterministic failure)."""
    log, marker = tmp_path / "ffmpeg-calls.log", tmp_path / "ffmpeg-killed-once"
    body = {"kill-once": f'if mkdir "{marker}" 2>/dev/null; then kill -9 $$; fi\nexec "{FFMPEG}" "$@"',
            "kill-always": "kill -9 $$",
            "reject": f'exec "{FFMPEG}" -no-such-option-here "$@"'}[mode]
    path = tmp_path / f"ffmpeg-{mode}"
    path.write_text(f'#!/bin/sh\necho "$$ $*" >> "{log}"\n{body}\n')
    path.chmod(0o755)
    return str(path)


def calls(tmp_path, *, clips: bool = False) -> int:
    """ffmpeg invocations so far; ``clips``: only the clip encodes (raw frames on a pipe), not the
    assembly's (concat, mix, subtitles)."""
    log = tmp_path / "ffmpeg-calls.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(1 for line in lines if not clips or "-f rawvideo" in line)


def clip_key(plan, node: str) -> str:
    return next(s.keys["clip"] for s in plan.shots if f"clip[{s.shot.id}]" == node)


# --------------------------------------------------------------------------- retried encoder


@pytest.mark.slow
def test_a_killed_encoder_is_retried_and_the_episode_is_identical_with_both_attempts_billed_once(
        local_ray, tmp_path, prices):
    plan = plan_for(prices)
    reference = render(plan, store=open_store(tmp_path / "reference"), prices=prices, ffmpeg=FFMPEG)
    store = open_store(tmp_path / "store")
    disturbed = render(plan, store=store, prices=prices, ffmpeg=wrapper(tmp_path, "kill-once"))

    # 1. It finished, and its episode is byte for byte the undisturbed one.
    assert (tmp_path / "ffmpeg-killed-once").is_dir()  # the encoder really was killed once
    assert disturbed.stopped is None and reference.stopped is None
    assert disturbed.outputs["episode.mp4"].read_bytes() == reference.outputs["episode.mp4"].read_bytes()
    assert calls(tmp_path, clips=True) == len(plan.shots) + 1  # every clip once, the killed one twice

    # 2. The killed attempt left one 'failed' note, the retry a finished one, both this render's.
    book = episode_ledger(plan, store)
    [failed] = [n for n in book.notes if n.why == FAILED]
    assert failed.holder == disturbed.render_id and failed.yuan > 0 and failed.node.startswith("clip[")
    same_key = [n for n in book.notes if n.key == failed.key]
    assert sorted(str(n.why) for n in same_key) == sorted([FAILED, "None"])
    assert book.holders() == {disturbed.render_id} and current(store, failed.key) is None

    # 3. The render's ledger bills the failed attempt once plus the retry: exactly the notes.
    shot = failed.node[len("clip["):-1]
    executed = Counter((r.stage, r.shot) for r in disturbed.ledger.records if not r.cached)
    assert executed[("inbetween", shot)] == 2 and executed[("encode", shot)] == 1
    assert Counter((r.stage, r.shot) for r in book.records()) == executed
    assert disturbed.ledger.total_yuan == pytest.approx(book.total_yuan)
    assert disturbed.episode_spent_yuan == pytest.approx(book.total_yuan)
    mine = [r for r in disturbed.ledger.records if (r.stage, r.shot) == ("inbetween", shot)]
    assert failed.rows[0].seconds in [r.seconds for r in mine]  # the failed attempt's own row, not a re-pricing


@pytest.mark.slow
def test_an_encoder_killed_every_time_fails_after_a_bounded_number_of_attempts_each_billed(
        local_ray, tmp_path, prices):
    plan = plan_for(prices)
    store = open_store(tmp_path / "store")
    with pytest.raises(NodeError) as err:
        render(plan, store=store, prices=prices, ffmpeg=wrapper(tmp_path, "kill-always"))
    line = str(err.value)
    assert "\n" not in line.strip() or line.count("\n") <= 1
    assert line.startswith("clip[") and "killed by signal 9" in line and f"(failed {1 + RETRIES} attempts)" in line
    key = clip_key(plan, err.value.node)
    notes = [n for n in episode_ledger(plan, store).notes if n.key == key]
    assert [n.why for n in notes] == [FAILED] * (1 + RETRIES)  # each attempt billed, once
    assert store.get(key) is None and current(store, key) is None


@pytest.mark.slow
def test_a_deterministic_encoder_failure_is_not_retried(local_ray, tmp_path, prices):
    plan = plan_for(prices)
    store = open_store(tmp_path / "store")
    with pytest.raises(NodeError) as err:
        render(plan, store=store, prices=prices, ffmpeg=wrapper(tmp_path, "reject"))
    line = str(err.value)
    assert err.value.node.startswith("clip[") and "ffmpeg stopped reading at frame 0" in line
    assert "killed" not in line and "attempts" not in line and "no-such-option-here" in line  # its stderr kept
    book = episode_ledger(plan, store)
    per_clip = Counter(n.key for n in book.notes if n.why == FAILED)
    assert per_clip and max(per_clip.values()) == 1  # one attempt per clip node
    # each clip that reached ffmpeg did so once (one that started beside the failing one may be
    # cancelled before its note is written, so the notes can be fewer than the calls)
    assert sum(per_clip.values()) <= calls(tmp_path) <= len(plan.shots)


# --------------------------------------------------------------------------- bounded start-up

START = """
import json, sys, time
import psutil
from pipeline.dag import Cluster
from stages.records import AnimError

options, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
t0 = time.monotonic()
try:
    Cluster(start_timeout_s=timeout, init_options=options).start()
    error = None
except AnimError as exc:
    error = str(exc)
took = time.monotonic() - t0
time.sleep(3)  # an abandoned start had time to start more: none may be left
left = [p.name() for p in psutil.Process().children(recursive=True)]
print(json.dumps({"error": error, "took": took, "left": left}))
"""


def start_in_a_fresh_driver(tmp_path, options: dict, timeout: float) -> dict:
    (tmp_path / "start.py").write_text(START)
    out = subprocess.run([sys.executable, str(tmp_path / "start.py"), json.dumps(options), str(timeout)], cwd=REPO,
                         capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def ours_left(marker: str) -> list[str]:
    """Processes anywhere on the machine whose command line names this test's Ray folder."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            if any(marker in part for part in p.info["cmdline"] or []):
                found.append(p.info["name"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture
def short_ray_dir():
    """Ray's socket paths must stay under 107 bytes; pytest's tmp_path can be longer than that allows."""
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_local_start_shorter_than_the_timeout_allows_fails_with_one_line_and_leaves_nothing(tmp_path, short_ray_dir):
    ray_dir = short_ray_dir / "ray"
    got = start_in_a_fresh_driver(tmp_path, {"_temp_dir": str(ray_dir), "num_cpus": 1}, 0.01)
    assert got["error"] == ("the local Ray cluster did not start within 0.01 s; nothing was rendered")
    # the message is the timeout's own (not a finished start's error); a start that hung instead of being
    # abandoned would end in the driver's 180 s subprocess limit, not in a speed assertion here
    assert got["left"] == [] and ours_left(str(ray_dir)) == []


def test_a_local_start_that_fails_is_one_line_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where Ray wants its folder")
    got = start_in_a_fresh_driver(tmp_path, {"_temp_dir": str(blocker / "ray"), "num_cpus": 1}, 60)
    error = got["error"]
    assert error is not None and "\n" not in error
    assert error.startswith("the local Ray cluster did not start: ") and error.endswith("; nothing was rendered")
    assert "not-a-folder" in error or "Not a directory" in error or "FileExistsError" in error
    assert got["left"] == [] and ours_left(str(blocker)) == []


def test_joining_an_address_that_never_answers_is_bounded(tmp_path):
    import socket

    # A listening socket that accepts and never speaks: reachable, but no Ray behind it.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    address = f"127.0.0.1:{server.getsockname()[1]}"
    script = tmp_path / "join.py"
    script.write_text("import sys, time\nfrom pipeline.dag import Cluster\nfrom stages.records import AnimError\n"
                      "t0 = time.monotonic()\ntry:\n    Cluster(sys.argv[1], start_timeout_s=3).start()\n"
                      "except AnimError as exc:\n    print(f'{time.monotonic() - t0:.1f}|{exc}')\n")
    try:
        out = subprocess.run([sys.executable, str(script), address], cwd=REPO, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        server.close()
    # (a join that hung instead of timing out would end in the 120 s subprocess limit above)
    _took, _, line = out.stdout.strip().splitlines()[-1].partition("|")
    assert line.startswith(f"the Ray cluster at RAY_ADDRESS={address} could not be joined")
    assert line.endswith("(unset RAY_ADDRESS to render on a local cluster)") and "\n" not in line
