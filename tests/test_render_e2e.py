"""End to end through the CLI: a real local Ray cluster, real ffmpeg, a real MLflow store."""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import imageio_ffmpeg
import mlflow
import pytest
import srt

from pipeline.service.cluster import free_ports

from .conftest import REPO

pytestmark = pytest.mark.slow


def anim(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("e2e")
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "MLFLOW_DISABLE_TELEMETRY": "true", "ANIM_STORE": str(root / "store"),
            "MLFLOW_ARTIFACTS_DESTINATION": str(root / "mlartifacts")}


def probe(path: Path) -> dict:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    return {**meta, "frames": frames}


@pytest.mark.parametrize("script, aspect, size", [
    ("examples/episode_en.fountain", "16:9", (640, 360)),
    ("examples/episode_zh.fountain", "9:16", (360, 640)),
    # real third-party material: a 5-minute public-domain cartoon web-series episode
    (str(REPO.parent / "shared" / "data" / "screenplays" / "cyber_bob_ep00001_traffic_control_dogs.fountain"),
     "16:9", (640, 360)),
], ids=["sample-en", "sample-zh-vertical", "cyber-bob"])
def test_render_sample_at_draft(tmp_path, env, script, aspect, size):
    out = tmp_path / "out"
    done = anim("render", script, "--profile", "draft", "--aspect", aspect, "--out", str(out), "--no-progress",
                env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    cost = json.loads((out / "cost.json").read_text())
    fps = plan["profile"]["fps"]
    total = sum(s["frames"] for s in plan["shots"])

    # The video: H.264 yuv420p at the plan's size and fps, as long as the plan within one frame.
    info = probe(out / "episode.mp4")
    assert info["codec"].startswith("h264") and info["pix_fmt"].startswith("yuv420p")
    assert tuple(info["size"]) == size and abs(info["fps"] - fps) < 1e-3
    assert abs(info["frames"] - total) <= 1
    assert abs(info["duration"] - total / fps) <= 1 / fps

    # Subtitles: the plan's cues, to the millisecond.
    subs = list(srt.parse((out / "subtitles.srt").read_text(encoding="utf-8")))
    assert len(subs) == len(plan["subtitles"]) > 0
    for sub, cue in zip(subs, plan["subtitles"]):
        assert abs(sub.start.total_seconds() - cue["start_s"]) < 0.002
        assert abs(sub.end.total_seconds() - cue["end_s"]) < 0.002
        assert cue["text"] in sub.content

    # The ledger covers every shot and stage; the MLflow run's cost equals its sum.
    # Every sample has dialogue: each line spoken (voice), the mix, and the burned-in subtitles.
    assert {r["stage"] for r in cost["records"]} == {"storyboard", "keyframes", "inbetween", "encode", "assemble",
                                                     "audit", "voice", "mix", "subtitles"}
    assert sum(r["stage"] == "voice" for r in cost["records"]) == len(plan["subtitles"])
    assert abs(cost["total_yuan"] - sum(r["yuan"] for r in cost["records"])) < 1e-12
    run_id = done.stdout.split("MLflow run:")[1].split()[0]
    run = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(run_id)
    assert run.data.metrics["cost_yuan"] == pytest.approx(cost["total_yuan"], rel=1e-9, abs=1e-12)
    assert run.data.metrics["frames"] == total
    assert run.data.params["profile.aspect"] == aspect
    for stage in ("storyboard", "keyframes", "inbetween", "encode", "assemble", "audit"):
        assert f"cost.{stage}_yuan" in run.data.metrics
    # Billed: the machine for the render's wall time; attributed cannot exceed it.
    assert 0 < run.data.metrics["utilization"] <= 1.0
    assert run.data.metrics["billed_yuan"] >= run.data.metrics["cost_yuan"]
    # The in-betweening audit of every shot that has in-betweens lands in the run.
    audited = [s for s in plan["shots"] if s["audit_frame"] is not None]
    assert audited and set(cost["quality"]) >= {s["scene"]["shot"]["id"] for s in audited}
    assert 15 < run.data.metrics["audit_psnr_db"] < 100 and 0 < run.data.metrics["audit_ssim"] <= 1
    artifacts = {a.path for a in mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).list_artifacts(run_id)}
    assert {"episode.mp4", "storyboard.png", "subtitles.srt", "ledger.json", "plan.json", "cost_chart.png",
            "quality.json", "timeline.otio"} <= artifacts
    assert (out / "storyboard.png").stat().st_size > 10_000

    # The editorial hand-off: one clip per shot, frame-exact against the plan.
    import opentimelineio as otio
    timeline = otio.adapters.read_from_file(str(out / "timeline.otio"))
    clips = list(timeline.video_tracks()[0].find_clips())  # the picture; the audio tracks hold the stems
    assert [c.name for c in clips] == [s["scene"]["shot"]["id"] for s in plan["shots"]]
    assert [c.source_range.duration.value for c in clips] == [s["frames"] for s in plan["shots"]]
    assert timeline.duration().value == total


BAD_INPUTS = {
    "empty.fountain": (b"", "empty"),
    "blank.fountain": (b"  \n\n\t\n", "empty"),
    "binary.fountain": (bytes(range(256)) * 4, "binary"),
    "latin1.fountain": ("INT. CAFÉ - DAY\n\nAya waits.\n".encode("latin-1"), "UTF-8"),
    "title_only.fountain": (b"Title: Nothing Here\nAuthor: Nobody\n", "no scenes"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_fails_cleanly(tmp_path, env, name):
    data, expected = BAD_INPUTS[name]
    script = tmp_path / name
    script.write_bytes(data)
    out = tmp_path / "out"
    done = anim("render", str(script), "--out", str(out), "--no-progress", env=env)
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, done.stderr
    assert str(script) in lines[0] and expected.lower() in lines[0].lower()
    assert "Traceback" not in done.stderr + done.stdout
    assert not (out / "episode.mp4").exists()


def test_plan_json_contract(env):
    done = anim("plan", "examples/episode_en.fountain", "--profile", "draft", "--json", env=env)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert {"shots", "total_frames", "estimated_cost_yuan"} <= set(data)
    assert {"id", "duration_s", "frames", "keyframes"} <= set(data["shots"][0])
    assert data["total_frames"] == sum(s["frames"] for s in data["shots"])
    assert 55 <= data["total_frames"] / 24 <= 75
    assert data["estimated_cost_yuan"] > 0


@contextmanager
def own_ray_head(env: dict[str, str], num_cpus: int = 2) -> Iterator[str]:
    """A Ray head node this test starts and stops itself; yields its address (``127.0.0.1:PORT``).

    ``ray start --head --block`` runs as our child in its own session, so its process group holds
    the GCS, raylet, workers and agents and nothing else; teardown signals exactly that group and
    waits for it, never the Ray CLI's stop command (which would end every Ray cluster of the user on the machine).
    Every port ``ray start`` would otherwise take at a fixed default (GCS 6379, dashboard 8265,
    dashboard agent 52365, Ray client 10001 where ray[client] is installed) is a free one; the others
    (node manager, object manager, metrics, runtime-env agent, workers) Ray picks itself. Its own
    temp dir keeps its session and address file away from other clusters' (``/tmp/ray``); it is
    short because Ray's socket paths must fit in 107 bytes.
    """
    gcs, dashboard, agent, client = free_ports(4)
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    log = temp_dir / "ray-start.log"
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--num-cpus={num_cpus}", "--include-dashboard=false", f"--dashboard-port={dashboard}",
           f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    if importlib.util.find_spec("grpc"):  # Ray's own rule: a client server (on 10001) only with ray[client]
        cmd.append(f"--ray-client-server-port={client}")
    head_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}  # start a head, do not join one
    # On SIGTERM `ray start --block` first drains the node for Ray Serve, up to 30 s; nothing here to drain.
    head_env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    with log.open("wb") as out:
        head = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=head_env, start_new_session=True)
    try:
        # --block prints this once the node is up (GCS, raylet, agents) and its address is written.
        deadline = time.monotonic() + 180
        while "block forever" not in log.read_text(errors="replace"):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up (exit {head.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{gcs}"
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_process_group(leader: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM the group ``leader`` leads (``start_new_session=True``), wait for it, SIGKILL what stays."""
    pgid = leader.pid  # a session leader's pid is its process group's id

    def signal_group(sig: int) -> bool:
        try:
            os.killpg(pgid, sig)
            return True
        except ProcessLookupError:
            return False  # nobody is left in the group

    signal_group(signal.SIGTERM)
    try:
        leader.wait(timeout=grace_s)  # ray start's SIGTERM handler stops its processes, then exits
    except subprocess.TimeoutExpired:
        signal_group(signal.SIGKILL)
        leader.wait(timeout=30)
    deadline = time.monotonic() + grace_s
    while signal_group(0) and time.monotonic() < deadline:  # workers and agents exiting after the leader
        time.sleep(0.2)
    signal_group(signal.SIGKILL)


def test_render_on_an_existing_ray_cluster(tmp_path, env):
    """The same command against a running cluster (RAY_ADDRESS): the code travels as py_modules.

    Ray ≥ 2.59 authenticates with a token: the cluster and the driver share it through
    RAY_AUTH_TOKEN, as a studio's cluster would (KubeRay sets the same variables).
    """
    env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    with own_ray_head(env) as address:
        done = anim("render", "examples/shotlist.yaml", "--out", str(tmp_path / "out"), "--no-progress",
                    env={**env, "RAY_ADDRESS": address, "ANIM_STORE": str(tmp_path / "store")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "episode.mp4").stat().st_size > 0
    cost = json.loads((tmp_path / "out" / "cost.json").read_text())
    assert cost["status"] == "complete" and cost["total_yuan"] > 0
    run_id = done.stdout.split("MLflow run:")[1].split()[0]
    assert mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(run_id).data.tags["cluster"] == address


def test_unreachable_cluster_is_one_clear_line(tmp_path, env):
    done = anim("render", "examples/shotlist.yaml", "--out", str(tmp_path / "out"), "--no-progress",
                env={**env, "RAY_ADDRESS": "127.0.0.1:1", "ANIM_STORE": str(tmp_path / "store")})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "127.0.0.1:1" in done.stderr and not (tmp_path / "out" / "episode.mp4").exists()
