"""One registry entry per backend: a backend defined in this module only renders an episode,
and the shipped entries plan and render (or refuse cleanly) through the same path."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest

from pipeline import registry
from pipeline.calibration import Calibration, CalibrationRow
from pipeline.config import resolve_profile
from pipeline.dag import Cluster
from pipeline.models import Profile
from pipeline.plan import make_plan
from pipeline.render import render
from pipeline.store import open_store
from stages.records import AnimError, Frame, KeyframeRequest, Keyframes, NodeError, ProfileError, Record
from stages.script import load_episode

from .conftest import REPO

EPISODE = REPO / "examples" / "shotlist.yaml"
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


# --------------------------------------------------------------------------- a toy backend, here only


class ToySettings(Record):
    shade: int = 90


class ToyKeyframes:
    """Flat frames whose colour comes from the request's seed and the frame index."""

    def __init__(self, *, width: int, height: int, shade: int):
        self.width, self.height, self.shade = width, height, shade

    def __call__(self, requests: list[KeyframeRequest]) -> list[Keyframes]:
        out = []
        for req in requests:
            frames = []
            for k in req.indices:
                image = np.full((self.height, self.width, 3), self.shade, np.uint8)
                image[..., 0] = (req.seed + k) % 256
                frames.append(Frame(index=k, image=image))
            out.append(Keyframes(shot=req.shot.id, frames=frames))
        return out


def build_toy(settings: ToySettings, *, width: int, height: int) -> ToyKeyframes:
    return ToyKeyframes(width=width, height=height, shade=settings.shade)


def toy_rows(calibration: Calibration) -> Calibration:
    toy = CalibrationRow(stage="keyframes", backend="toy", device="cpu", unit="keyframe", overhead_s=0.0,
                         seconds_per_unit_mpx=0.01, source="test", measured_at="")
    return Calibration(rows=[*calibration.rows, toy], paths=[])


@pytest.fixture
def toy():
    entry = registry.register(registry.Backend("keyframes", "toy", ToySettings, build=build_toy,
                                               calibration=lambda s: "toy"), replace=True)
    yield entry
    registry.unregister("keyframes", "toy")


@pytest.fixture(scope="module")
def ray_cluster():
    Cluster().start()


def test_a_backend_defined_in_a_test_module_renders_an_episode(toy, ray_cluster, calibration, prices, tmp_path):
    profile = Profile(name="toy", backend="toy", toy={"shade": 40}, short_side=96, audit=False)
    assert isinstance(profile.settings_for("keyframes"), ToySettings)
    plan = make_plan(load_episode(EPISODE), profile, calibration=toy_rows(calibration), prices=prices,
                     script_sha256="0" * 64)
    store = open_store(tmp_path / "store")
    result = render(plan, store=store, prices=prices, ffmpeg=FFMPEG)
    assert result.stopped is None and result.outputs["episode.mp4"].stat().st_size > 0
    # the keyframes were drawn by the toy: flat, in its shade
    kf = store.get(plan.shots[0].keys["keyframes"])
    from pipeline.nodes import load_png

    image = load_png(next(p for n, p in kf.items() if n.startswith("key_")))
    assert (image[..., 1] == 40).all() and (image[..., 2] == 40).all()
    # its settings enter its keys: another shade, other keyframe keys, same storyboard keys
    other = make_plan(load_episode(EPISODE), profile.with_settings("keyframes", shade=41),
                      calibration=toy_rows(calibration), prices=prices, script_sha256="0" * 64)
    assert all(a.keys["keyframes"] != b.keys["keyframes"] for a, b in zip(plan.shots, other.shots))
    assert all(a.keys["storyboard"] == b.keys["storyboard"] for a, b in zip(plan.shots, other.shots))


def test_an_unknown_backend_or_table_is_one_profile_error():
    with pytest.raises(ProfileError, match=r"backend = 'nope': no such keyframes backend; known: .*previz"):
        Profile(name="x", backend="nope")
    with pytest.raises(ProfileError, match=r"unknown profile field or table 'flow_preset' \(moved: \[flow\] preset\)"):
        Profile(name="x", flow_preset="fast")
    with pytest.raises(ProfileError, match=r"\[flow\] preset"):
        Profile(name="x", flow={"preset": "slowest"})


def test_crossfade_plans_and_renders(ray_cluster, calibration, prices, tmp_path):
    profile = resolve_profile("draft", {"interpolation": "crossfade", "short_side": 96})
    plan = make_plan(load_episode(EPISODE), profile, calibration=calibration, prices=prices, script_sha256="0" * 64)
    assert plan.estimate_by_stage()["inbetween"] > 0
    result = render(plan, store=open_store(tmp_path / "store"), prices=prices, ffmpeg=FFMPEG)
    assert result.stopped is None
    assert {r.stage for r in result.ledger.records if not r.cached} >= {"storyboard", "keyframes", "inbetween"}


def test_rife_on_a_gpu_is_a_valid_profile_that_asks_ray_for_a_gpu(ray_cluster, calibration, prices, tmp_path):
    profile = resolve_profile(str(REPO / "examples" / "profiles" / "draft_rife_gpu.toml"))
    assert profile.resources("inbetween").gpus == 1.0 and profile.resources("inbetween").resource == "gpu:H200"
    plan = make_plan(load_episode(EPISODE), profile, calibration=calibration, prices=prices, script_sha256="0" * 64)
    rows = {r.stage: r for r in [calibration.row("inbetween", "rife", "gpu:H200")]}
    assert rows["inbetween"].source.startswith("measured on NVIDIA H200")
    store = open_store(tmp_path / "store")
    with pytest.raises(AnimError, match="no GPU in the cluster for the rife in-betweener") as err:
        render(plan, store=store, prices=prices, ffmpeg=FFMPEG)
    assert "nothing was rendered" in str(err.value)
    assert store.stats().entries == 0  # refused before any node ran


class BrokenKeyframes(ToyKeyframes):
    def __call__(self, requests):
        if any(r.shot.id == "sc01-sh02" for r in requests):
            raise ZeroDivisionError("the toy cannot draw this shot")
        return super().__call__(requests)


def test_a_failing_node_names_its_stage_and_shot_and_keeps_the_worker_traceback(ray_cluster, calibration, prices,
                                                                                  tmp_path):
    registry.register(registry.Backend("keyframes", "toy", ToySettings, calibration=lambda s: "toy",
                                       build=lambda s, *, width, height: BrokenKeyframes(width=width, height=height,
                                                                                         shade=s.shade)), replace=True)
    try:
        plan = make_plan(load_episode(EPISODE), Profile(name="toy", backend="toy", short_side=96, audit=False),
                         calibration=toy_rows(calibration), prices=prices, script_sha256="0" * 64)
        with pytest.raises(NodeError) as err:
            render(plan, store=open_store(tmp_path / "store"), prices=prices, ffmpeg=FFMPEG)
    finally:
        registry.unregister("keyframes", "toy")
    assert str(err.value) == "keyframes[sc01-sh02]: ZeroDivisionError: the toy cannot draw this shot"
    assert "in __call__" in err.value.remote_traceback and "raise ZeroDivisionError" in err.value.remote_traceback


def test_the_cli_prints_one_line_and_debug_the_chained_traceback(tmp_path):
    env = {**os.environ, "ANIM_STORE": str(tmp_path / "store"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    env.pop("ANIM_DEBUG", None)
    junk = tmp_path / "junk.pkl"  # exists, so plan accepts it; fails only when a clip node loads it
    junk.write_bytes(b"not a torch state dict")
    args = ["render", str(EPISODE), "--profile", str(REPO / "examples" / "profiles" / "draft_rife.toml"),
            "--set", f"rife.weights={junk}", "--no-progress", "--out", str(tmp_path / "out")]

    def anim(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", *extra, *args], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    plain = anim()
    # Ray's and MLflow's own log lines carry a timestamp; what the CLI says does not
    lines = [ln for ln in plain.stderr.splitlines() if ln.strip() and not re.match(r"\d{4}[-/]\d\d[-/]\d\d ", ln)]
    assert plain.returncode == 1 and len(lines) == 1, plain.stderr
    assert lines[0].startswith("error: clip[sc0") and "junk.pkl" in lines[0]
    assert "finished nodes are kept in the artifact store" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing published
    debug = anim("--debug")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "in the worker:" in debug.stderr
    worker = debug.stderr.split("in the worker:", 1)[1]  # the cause, where it was raised
    assert "stages/rife.py" in worker and "StageError: inbetween:" in worker
