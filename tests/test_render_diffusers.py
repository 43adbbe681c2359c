"""A tiny episode rendered end to end through the diffusers backend: real diffusers classes with
random weights (built in code, nothing downloaded), model actors on a real local Ray cluster."""
from __future__ import annotations

import csv
import hashlib

import imageio_ffmpeg
import pytest

pytest.importorskip("torch", reason="the diffusers backend needs the gen extra (make test installs it)")

from pipeline import dag  # noqa: E402
from pipeline.store import open_store  # noqa: E402
from pipeline.calibration import FIELDS, Calibration  # noqa: E402
from pipeline.config import resolve_profile  # noqa: E402
from pipeline.cost import PriceCatalog  # noqa: E402
from pipeline.render import render as render_plan  # noqa: E402
from stages.records import Camera, Episode, Scene, Shot  # noqa: E402
from pipeline.plan import make_plan  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.tiny_diffusers import save_sd15  # noqa: E402

pytestmark = pytest.mark.slow


def episode() -> Episode:
    """Three shots: two on the same street (one plate), one in a classroom (another plate)."""
    def shot(i: int, scene: int, camera: Camera, chars: list[str], action: str) -> Shot:
        return Shot(id=f"sc{scene:02d}-sh{i:02d}", scene=scene, camera=camera, duration_s=1.0, characters=chars,
                    action=action, line=i)
    street = Scene(index=1, heading="EXT. STREET - DAY", location="STREET", setting="EXT", time_of_day="DAY", line=1,
                   shots=[shot(1, 1, Camera.WIDE, ["MAYA"], "Maya walks in."),
                          shot(2, 1, Camera.MEDIUM, ["MAYA", "KENJI"], "Kenji runs to Maya.")])
    room = Scene(index=2, heading="INT. CLASSROOM - NIGHT", location="CLASSROOM", setting="INT", time_of_day="NIGHT",
                 line=9, shots=[shot(1, 2, Camera.CLOSE_UP, ["KENJI"], "Kenji turns.")])
    return Episode(title="Tiny", source="tiny.yaml", characters=["MAYA", "KENJI"], scenes=[street, room])


def tiny_plan(root, prices: PriceCatalog, *, sha: bytes):
    """The tiny episode on a real SD 1.5-class pipeline with random weights, saved under ``root``,
    planned with the measured CPU rows plus one for the tiny model on this CPU."""
    model = save_sd15(root / "sd15")
    table = root / "calibration.csv"
    rows = list(csv.DictReader((REPO / "cluster" / "calibration.csv").open()))
    rows.append({"stage": "keyframes", "backend": "diffusers:sd15:s2", "device": "cpu", "unit": "keyframe",
                 "overhead_s": "0.5", "seconds_per_unit_mpx": "20", "source": "test", "measured_at": "test"})
    with table.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    settings = dict(model=str(model), device="cpu", dtype="float32", steps=2, strength=0.6, batch_size=4,
                    layered=True, num_gpus=0, actors=1, gen_short_side=64,
                    characters={"MAYA": "girl, orange bob hair", "KENJI": "boy, glasses"})
    profile = resolve_profile("draft", {"backend": "diffusers", "short_side": 64, "fps": 12,
                                        "keyframe_stride": 3, "diffusers": settings})
    return make_plan(episode(), profile, calibration=Calibration.load(table), prices=prices,
                     script_sha256=hashlib.sha256(sha).hexdigest())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("diffusers_e2e")
    prices = PriceCatalog.load(REPO / "cluster" / "prices.csv", usd_cny=7.1)
    plan = tiny_plan(root, prices, sha=b"tiny")
    dag.Cluster().start()
    yield plan, prices, root
    ray.shutdown()


def render(plan, prices, store):
    return render_plan(plan, store=store, prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe())


def test_diffusers_episode_renders_with_one_plate_per_location(setup):
    plan, prices, root = setup
    store = open_store(root / "store")
    result = render(plan, prices, store)
    assert result.stopped is None and result.outputs["episode.mp4"].stat().st_size > 0
    executed = [r for r in result.ledger.records if not r.cached]
    # Two locations → two plate nodes, each drawn once and read by every shot there; on a cold
    # store none is a hit. Two characters → two sheets.
    assert sum(r.stage == "plates" for r in executed) == 2
    assert len(result.schedule.where("run", "plates")) == 2
    assert not any(r.stage == "plates" and r.cached for r in result.ledger.records)
    assert sum(r.stage == "sheets" for r in executed) == 2
    assert {r.shot for r in executed if r.stage == "keyframes"} == {s.shot.id for s in plan.shots}
    # The consistency score of each character across the shots it appears in.
    assert set(result.consistency) == {"MAYA", "KENJI"}
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in result.consistency.values())
    assert all(r.resource == "cpu" for r in executed)  # num_gpus = 0 here; on a GPU: gpu:<type> × num_gpus
    # Identical seeds → identical pixels: a fresh store renders the same keyframes bit for bit.
    again = render(plan, prices, open_store(root / "store2"))
    for shot in plan.shots:
        a = store.get(shot.keys["keyframes"])
        b = open_store(root / "store2").get(shot.keys["keyframes"])
        assert {n: p.read_bytes() for n, p in a.items()} == {n: p.read_bytes() for n, p in b.items()}
    assert again.ledger.total_yuan > 0
    # A second render into the same store: every node, plates and sheets included, is a hit.
    third = render(plan, prices, store)
    assert third.ledger.total_yuan == 0 and all(r.cached for r in third.ledger.records)


def test_missing_weights_stop_the_render_before_any_work(setup, tmp_path):
    from stages.records import AnimError

    plan, prices, root = setup
    broken = plan.profile.with_settings("keyframes", model=str(tmp_path / "no-such-model"))
    plan = make_plan(episode(), broken, calibration=Calibration.load(root / "calibration.csv"), prices=prices,
                     script_sha256=plan.script_sha256)
    store = open_store(tmp_path / "store")
    with pytest.raises(AnimError, match=r"the diffusers backend could not start: diffusers.model: "
                                        r".*no-such-model.*model_index.json.*nothing was rendered"):
        render(plan, prices, store)
    assert store.stats().entries == 0  # not even a storyboard panel was drawn
