"""A render that ends (a failure, the cap) while a node is still queued for resources on a shared
cluster: the node is told to stop through the store, and when it has not come back within
``STOP_WAIT_S`` — it never got a worker — Ray cancels it. It costs nothing, leaves no lease and
no stop word behind, and the next render, with the resources free, runs it. A real local Ray
cluster of two CPUs, one of them held by another job's actor for as long as the test says."""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from pipeline import dag, registry
from pipeline.calibration import Calibration, CalibrationRow
from pipeline.ledger import episode_ledger, stopped
from pipeline.models import Profile
from pipeline.plan import make_plan
from pipeline.render import render
from pipeline.store import open_store
from pipeline.store.lease import current
from stages.records import AnimError, Frame, KeyframeRequest, Keyframes, Record, StageError
from stages.script import load_episode

from .conftest import REPO

pytestmark = pytest.mark.slow
EPISODE = load_episode(REPO / "examples" / "shotlist.yaml")
SHA = hashlib.sha256(EPISODE.model_dump_json().encode()).hexdigest()
WAIT_S = 2.0


@pytest.fixture(scope="module")
def two_cpus():
    """A local cluster of exactly two CPUs (whatever this machine has), this module's own."""
    import ray

    dag.Cluster(num_cpus=2).start()
    yield
    ray.shutdown()


class WideSettings(Record):
    pass


class WideKeyframes:
    """Flat keyframes from a worker that holds two CPUs."""

    def __init__(self, *, width: int, height: int):
        self.width, self.height = width, height

    def __call__(self, requests: list[KeyframeRequest]) -> list[Keyframes]:
        flat = np.full((self.height, self.width, 3), 90, np.uint8)
        return [Keyframes(shot=r.shot.id, frames=[Frame(index=k, image=flat) for k in r.indices]) for r in requests]


class FailOnceSettings(Record):
    flag: str = ""  # a file: while it exists, the panel of `shot` fails (and removes it)
    shot: str = ""


class FailOnceBoard:
    """Flat panels; the given shot's fails once, after the others have had time to queue their keyframes."""

    def __init__(self, *, width: int, aspect: str, flag: str, shot: str):
        self.width, self.height = width, round(width * 9 / 16)
        self.flag, self.shot = Path(flag), shot

    def __call__(self, scene) -> np.ndarray:
        if scene.shot.id == self.shot and self.flag.exists():
            time.sleep(1.0)
            self.flag.unlink()
            raise StageError("storyboard", self.shot, "failed on purpose")
        return np.full((self.height, self.width, 3), 200, np.uint8)


@pytest.fixture
def backends():
    registry.register(registry.Backend("keyframes", "wide", WideSettings,
                                       build=lambda s, *, width, height: WideKeyframes(width=width, height=height),
                                       calibration=lambda s: "wide", resources=lambda s: registry.Resources(cpus=2)),
                      replace=True)
    registry.register(registry.Backend("storyboard", "failonce", FailOnceSettings,
                                       build=lambda s, *, width, aspect: FailOnceBoard(width=width, aspect=aspect,
                                                                                      flag=s.flag, shot=s.shot),
                                       calibration=lambda s: "previz"), replace=True)
    yield
    registry.unregister("keyframes", "wide")
    registry.unregister("storyboard", "failonce")


def test_a_node_queued_for_resources_when_the_render_fails_is_cancelled_after_the_wait_and_costs_nothing(
        two_cpus, backends, calibration, prices, tmp_path, monkeypatch, caplog):
    import ray

    monkeypatch.setattr(dag, "STOP_WAIT_S", WAIT_S)
    caplog.set_level(logging.INFO, logger="pipeline.dag")
    flag = tmp_path / "fail-once"
    flag.touch()
    last = EPISODE.shots[-1].id
    rows = [CalibrationRow(stage="keyframes", backend="wide", device="cpu", unit="keyframe", overhead_s=0.0,
                           seconds_per_unit_mpx=0.01, source="test", measured_at="")]
    profile = Profile(name="wide", backend="wide", storyboard="failonce", audit=False,
                      failonce=FailOnceSettings(flag=str(flag), shot=last))
    plan = make_plan(EPISODE, profile, calibration=Calibration(rows=[*calibration.rows, *rows], paths=[]),
                     prices=prices, script_sha256=SHA)
    store = open_store(tmp_path / "store")
    hog = ray.remote(num_cpus=1)(_Hog).remote()  # another job on the shared cluster
    ray.get(hog.ping.remote())
    try:
        with pytest.raises(AnimError, match="failed on purpose"):
            render(plan, store=store, prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe())
    finally:
        ray.kill(hog)
    keyframes = {s.keys["keyframes"] for s in plan.shots}
    book = episode_ledger(plan, store)
    assert not [n for n in book.notes if n.key in keyframes]  # never started: nothing spent, nothing on record
    assert all(current(store, k) is None for k in keyframes)
    assert not any(stopped(store, k, n.holder) for k in keyframes for n in book.notes)
    assert "told to stop were still queued for resources after 2 s: cancelled in Ray" in caplog.text
    # the resources free, the next render runs them; the panels already drawn are hits
    result = render(plan, store=store, prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe())
    assert result.stopped is None and "episode.mp4" in result.outputs
    ran = {r.shot for r in result.ledger.records if r.stage == "keyframes" and not r.cached}
    assert ran == {s.shot.id for s in plan.shots}


class _Hog:
    def ping(self) -> bool:
        return True
