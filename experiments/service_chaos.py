"""Chaos against the render service (issue #12): N jobs from three producers while the service,
a driver and a Ray worker are SIGKILLed at random moments; nothing may be lost, run twice,
billed twice or come out different.

Every job's script is also rendered undisturbed first, by a direct ``anim render`` on a store of
its own, for the reference frame checksums (ffmpeg framemd5). Then the jobs go to the service
(at most 2 at once on a 2-core head) and, until all are done, every few seconds one disturbance
is drawn:

* ``service`` — SIGKILL ``anim serve``, start it again (it reconciles the table with Ray's jobs);
* ``driver``  — SIGKILL a running job's ``anim render`` (the service resubmits a new attempt);
* ``worker``  — SIGKILL a busy Ray worker of the head (Ray retries the task);
* ``head``    — SIGKILL the whole Ray head, its node lost (``--heads``, once by default): the service
  replaces a head that has not worked for a minute and resubmits its jobs as new attempts;
* ``raylet``  — SIGKILL the head's raylet alone (``--raylets``, none by default), the GCS and the
  dashboard left answering: the node is lost under a Jobs API that still works, its CPUs gone.

Printed: jobs submitted / finished / lost / duplicated (a job with two succeeded Ray
submissions), nodes billed twice (a content key with two finished spend notes), outputs identical
to the undisturbed renders, and what was killed.

    .venv/bin/python experiments/service_chaos.py [--jobs 6] [--seed 7] [--script examples/shotlist.yaml]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import imageio_ffmpeg
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from pipeline.config import resolve_settings  # noqa: E402
from pipeline.ledger import episode_ledger  # noqa: E402
from pipeline.service.client import ServiceClient  # noqa: E402
from pipeline.service.cluster import JobsEndpoint, local_endpoint, stop_local_head  # noqa: E402
from pipeline.service.db import TERMINAL  # noqa: E402
from pipeline.service.process import ServiceProcess, add_account, isolated_env  # noqa: E402
from pipeline.store import open_store  # noqa: E402
from service_overhead import direct_render, variant  # noqa: E402

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
NODE_TASK = re.compile(r"ray::(\w+_node|KeyframeWorker|VoiceWorker)\b")


def framemd5(video: Path) -> list[str]:
    text = subprocess.run([FFMPEG, "-v", "error", "-i", str(video), "-map", "0:v", "-f", "framemd5", "-"],
                          capture_output=True, text=True, check=True).stdout
    return [line.rsplit(",", 1)[-1].strip() for line in text.splitlines() if line and not line.startswith("#")]


def drivers(data: Path) -> list[psutil.Process]:
    """Running ``anim render`` drivers of this service's jobs."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "render" in cmd and "--progress-file" in cmd and any(str(data / "jobs") in c for c in cmd):
            out.append(p)
    return out


def raylets(head_pgid: int) -> list[psutil.Process]:
    """The raylet of our head (its session)."""
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if os.getsid(p.pid) == head_pgid and Path((p.info["cmdline"] or [""])[0]).name == "raylet":
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def busy_workers(head_pgid: int) -> list[psutil.Process]:
    """Ray workers of our head (its session) running a task."""
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if os.getsid(p.pid) != head_pgid:
                continue
        except (ProcessLookupError, PermissionError):
            continue
        title = " ".join(p.info["cmdline"] or [])
        if NODE_TASK.match(title):  # a render's task or model actor, never Ray's own agents
            out.append(p)
    return out


def current_head(data: Path) -> JobsEndpoint:
    """The head the service uses now (it records a head it starts in place of a dead one)."""
    rec = json.loads((data / "ray" / "head.json").read_text())
    return JobsEndpoint(rec["dashboard_url"], (data / "ray" / "token").read_text().strip(), local=True,
                        pgid=rec["pgid"], temp_dir=rec.get("temp_dir"))


def billed_twice(env: dict, script: Path) -> int:
    from pipeline.cli import _prepare

    settings = resolve_settings(env=env)
    plan = _prepare(settings, script, "draft", None)[3]
    book = episode_ledger(plan, open_store(settings.store))
    return sum(1 for c in Counter(n.key for n in book.notes if n.why is None).values() if c > 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--script", type=Path, default=REPO / "examples" / "shotlist.yaml")
    ap.add_argument("--every", type=float, default=4.0, help="Seconds between disturbances (mean).")
    ap.add_argument("--heads", type=int, default=1, help="How many times the whole head is killed.")
    ap.add_argument("--raylets", type=int, default=0, help="How many times the head's raylet alone is killed.")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="anim-service-chaos-"))
    env = isolated_env(root, ANIM_SERVICE_MAX_RENDERS="2")
    scripts = [variant(args.script, f"chaos{i}", root) for i in range(args.jobs)]
    # 1. The undisturbed references, each on its own store.
    reference = {}
    for i, s in enumerate(scripts):
        direct_render({**env, "ANIM_STORE": str(root / f"ref-store-{i}")}, s, root / f"ref-{i}")
        reference[s] = framemd5(root / f"ref-{i}" / "episode.mp4")
    head = local_endpoint(root / "data", num_cpus=2)
    killed: Counter = Counter()
    try:
        users = ("mei", "kai", "lin")
        tokens = {u: add_account(env, u) for u in users}
        service = ServiceProcess(env, log=root / "serve.log").start()
        jobs = []  # (user, id, script)
        for i, s in enumerate(scripts):
            user = users[i % 3]
            jobs.append((user, ServiceClient(service.url, tokens[user]).submit(s)["id"], s))
        # 2. Disturb until every job has ended.
        deadline = time.monotonic() + 3600
        admin_view = lambda: {j["id"]: j for u in users for j in ServiceClient(service.url, tokens[u]).jobs()}  # noqa: E731
        while time.monotonic() < deadline:
            time.sleep(rng.expovariate(1 / args.every))
            view = admin_view()
            if all(view.get(jid, {}).get("status") in TERMINAL for _, jid, _ in jobs):
                break
            kind = rng.choice(("service", "driver", "worker"))
            if killed["head"] < args.heads and rng.random() < 0.25:  # the head goes early, while renders run
                kind = "head"
            elif killed["raylet"] < args.raylets and rng.random() < 0.25:
                kind = "raylet"
            if kind == "service":
                service.kill()
                time.sleep(rng.uniform(0.5, 3))
                service.start()
                killed["service"] += 1
            elif kind == "driver" and (found := drivers(root / "data")):
                rng.choice(found).send_signal(signal.SIGKILL)
                killed["driver"] += 1
            elif kind == "head" and drivers(root / "data"):
                os.killpg(current_head(root / "data").pgid, signal.SIGKILL)
                killed["head"] += 1
            elif kind == "raylet" and drivers(root / "data") and (found := raylets(current_head(root / "data").pgid)):
                found[0].send_signal(signal.SIGKILL)
                killed["raylet"] += 1
            elif kind == "worker" and (found := busy_workers(current_head(root / "data").pgid)):
                try:
                    rng.choice(found).send_signal(signal.SIGKILL)
                    killed["worker"] += 1
                except psutil.NoSuchProcess:
                    pass
        view = admin_view()
        # 3. Judge.
        # (a head killed takes its job list with it: Ray's view covers the jobs since the last one started)
        ray_ok = Counter(j.metadata.get("job") for j in current_head(root / "data").client().list_jobs()
                         if str(j.status).endswith("SUCCEEDED"))
        finished = [jid for _, jid, _ in jobs if view.get(jid, {}).get("status") == "succeeded"]
        lost = [jid for _, jid, _ in jobs if jid not in view or view[jid]["status"] != "succeeded"]
        duplicated = [jid for _, jid, _ in jobs if ray_ok[str(jid)] > 1]
        identical = sum(framemd5(root / "data" / "jobs" / str(jid) / "out" / "episode.mp4") == reference[s]
                        for _, jid, s in jobs if jid in finished)
        twice = sum(billed_twice(env, s) for s in scripts)
        attempts = {jid: view[jid]["attempt"] for _, jid, _ in jobs if jid in view}
        service.kill()
    finally:
        last = current_head(root / "data")
        stop_local_head(head)
        if last.pgid != head.pgid:
            stop_local_head(last)
    print(f"jobs submitted {len(jobs)}, finished {len(finished)}, lost {len(lost)} {lost or ''}, duplicated "
          f"{len(duplicated)}; nodes billed twice {twice}; outputs identical to the undisturbed renders "
          f"{identical}/{len(finished)}")
    print(f"killed: service {killed['service']}, driver {killed['driver']}, worker {killed['worker']}, "
          f"head {killed['head']}, raylet alone {killed['raylet']}; "
          f"attempts per job {attempts}")
    for jid in lost:
        print(f"  job {jid}: {view.get(jid, {}).get('status')}: {view.get(jid, {}).get('error')}")
    print(json.dumps({"submitted": len(jobs), "finished": len(finished), "lost": len(lost),
                      "duplicated": len(duplicated), "billed_twice": twice, "identical": identical,
                      "killed": dict(killed), "attempts": attempts}))


if __name__ == "__main__":
    main()
