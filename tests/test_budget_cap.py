"""A budget that is a cap (#10.3), on a real local Ray cluster: with calibration rows made three
times optimistic (so this machine is three times slower than its rows say, whatever its speed),
a render spends at most its budget plus 5% for nodes already running when the cap is reached,
always publishes the contact sheet (or says the storyboard itself does not fit), and a resume
with the same budget does not pass it across both renders. A node cancelled in flight is billed
for the time it ran. No wall time is asserted: figures side by side are
``experiments/budget_overshoot.py``."""
from __future__ import annotations

import hashlib
import time

import imageio_ffmpeg
import numpy as np
import pytest

from pipeline import registry
from pipeline.calibrate import node_samples
from pipeline.calibration import Calibration, CalibrationRow
from pipeline.config import resolve_profile
from pipeline.ledger import CANCELLED, episode_ledger
from pipeline.models import Profile
from pipeline.plan import make_plan
from pipeline.render import render
from pipeline.store import open_store
from pipeline.store.lease import current
from stages.records import Frame, KeyframeRequest, Keyframes, Record
from stages.script import load_episode

from .conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
EPISODE = load_episode(REPO / "examples" / "shotlist.yaml")
SHA = hashlib.sha256(EPISODE.model_dump_json().encode()).hexdigest()
CAP = 1.05  # what nodes already running may add to a budget


def optimistic(calibration: Calibration, factor: float) -> Calibration:
    """The same rows, ``factor`` times faster than they were measured."""
    return Calibration(rows=[r.model_copy(update={"overhead_s": r.overhead_s / factor,
                                                  "seconds_per_unit_mpx": r.seconds_per_unit_mpx / factor})
                             for r in calibration.rows], paths=[])


def run(plan, store, prices, **kw):
    return render(plan, store=store, prices=prices, ffmpeg=FFMPEG, **kw)


def assert_within_cap(result, budget: float) -> None:
    """Spent (the episode's, across renders) at most the budget, or — only if the cap was reached
    with nodes running — at most 5% more; the contact sheet, or the reason there is none."""
    spent = result.budget_spent_yuan
    assert spent <= budget * CAP, f"spent ¥{spent:.6f} of ¥{budget:.6f} ({spent / budget:.1%})"
    # past the budget only by nodes running when the cap was reached — in this render, or in an
    # earlier one of the episode (a resume then spends nothing more)
    assert spent <= max(budget, result.spent_before_yuan) or result.cap_reached
    if result.stopped is None:
        assert "episode.mp4" in result.outputs and "storyboard.png" in result.outputs
    else:
        assert "storyboard.png" in result.outputs or "storyboard" in (result.budget_note or "")


def test_rows_three_times_optimistic_never_pass_the_budget_and_a_resume_stays_inside_it(calibration, prices,
                                                                                        tmp_path):
    rows_say = make_plan(EPISODE, resolve_profile("draft"), calibration=calibration, prices=prices, script_sha256=SHA)
    plan = make_plan(EPISODE, resolve_profile("draft"), calibration=optimistic(calibration, 3.0), prices=prices,
                     script_sha256=SHA)
    assert plan.estimated_cost_yuan == pytest.approx(rows_say.estimated_cost_yuan / 3, rel=0.01)
    for i, fraction in enumerate((0.2, 0.4, 0.8, 4.0)):  # of what the true rows estimate
        budget = fraction * rows_say.estimated_cost_yuan
        store = open_store(tmp_path / f"store{i}")
        first = run(plan, store, prices, budget_yuan=budget)
        assert first.budget_scope == "episode" and first.spent_before_yuan == 0.0
        assert_within_cap(first, budget)
        # everything it paid — finished nodes and the partial time of cancelled ones — is on record
        assert episode_ledger(plan, store).total_yuan == pytest.approx(first.ledger.total_yuan)
        assert first.episode_spent_yuan == pytest.approx(first.ledger.total_yuan)
        if fraction >= 0.8:  # ten times what the storyboard pass costs, even on workers that just started
            assert "storyboard.png" in first.outputs
        # the same budget again is the same cap: the episode's spend so far counts
        resumed = run(plan, store, prices, budget_yuan=budget)
        assert resumed.spent_before_yuan == pytest.approx(first.ledger.total_yuan)
        assert_within_cap(resumed, budget)
        assert resumed.episode_spent_yuan == pytest.approx(first.ledger.total_yuan + resumed.ledger.total_yuan)
        assert not (set(resumed.remaining) - set(first.remaining))  # nothing finished is lost or redone


def test_under_a_budget_the_storyboard_comes_first_and_one_chain_learns_before_the_others_start(
        calibration, prices, tmp_path):
    """Learn before widening: with no history, the first panel runs alone, then the other panels
    and the voices; the first chain runs alone; the others start only once its keyframes and clip
    have measured how far this machine runs from the rows.
    (Spans are each node's start and end on the worker: an order, not a speed, is asserted.)"""
    plan = make_plan(EPISODE, resolve_profile("draft"), calibration=calibration, prices=prices, script_sha256=SHA)
    result = run(plan, open_store(tmp_path / "store"), prices, budget_yuan=50 * plan.estimated_cost_yuan)
    assert result.stopped is None and not result.cap_reached
    spans = sorted(result.spans, key=lambda s: s[1])
    boards = [s for s in spans if s[0] == "storyboard"]  # the panels, then the contact sheet made early
    keyframes = [s for s in spans if s[0].startswith("keyframes")]
    clips = [s for s in spans if s[0].startswith("inbetween")]
    assert len(boards) == len(plan.shots) + 1 and len(keyframes) == len(clips) == len(plan.shots)
    assert max(end for _, _, end in boards[:-1]) <= min(keyframes[0][1], boards[-1][1])
    assert keyframes[1][1] >= clips[0][2]  # the second chain waited for the first one's clip
    # the first panel ran alone, and the others and the voices were admitted at the margin it taught
    voices = [s for s in spans if s[0] == "voice"]
    assert voices and boards[0][2] <= min(boards[1][1], voices[0][1])


def test_a_budget_the_storyboard_does_not_fit_spends_nothing_and_says_so(calibration, prices, tmp_path):
    plan = make_plan(EPISODE, resolve_profile("draft"), calibration=calibration, prices=prices, script_sha256=SHA)
    result = run(plan, open_store(tmp_path / "store"), prices, budget_yuan=plan.shots[0].estimate_yuan["storyboard"])
    assert result.stopped == "budget" and result.outputs == {} and result.ledger.total_yuan == 0.0
    assert "does not cover the storyboard" in result.budget_note


def test_a_render_budget_scope_caps_this_invocation_only(calibration, prices, tmp_path):
    plan = make_plan(EPISODE, resolve_profile("draft"), calibration=calibration, prices=prices, script_sha256=SHA)
    store = open_store(tmp_path / "store")
    boards = run(plan, store, prices, stop_after="storyboard")
    budget = 0.9 * boards.ledger.total_yuan  # the episode has spent past it already
    episode = run(plan, store, prices, budget_yuan=budget)
    assert episode.stopped == "budget" and episode.ledger.total_yuan == 0.0
    assert "storyboard.png" in episode.outputs  # a hit: the sheet is delivered at no cost
    alone = run(plan, store, prices, budget_yuan=10 * plan.estimated_cost_yuan, budget_scope="render")
    assert alone.stopped is None and alone.budget_spent_yuan == alone.ledger.total_yuan
    with pytest.raises(ValueError, match="budget_scope"):
        run(plan, store, prices, budget_scope="series")


# --------------------------------------------------------------------------- a node cancelled in flight


class NapSettings(Record):
    nap_s: float = 8.0


class NapKeyframes:
    """Flat keyframes after a nap: a backend far slower than its calibration row says."""

    def __init__(self, *, width: int, height: int, nap_s: float):
        self.width, self.height, self.nap_s = width, height, nap_s

    def __call__(self, requests: list[KeyframeRequest]) -> list[Keyframes]:
        time.sleep(self.nap_s)
        flat = np.full((self.height, self.width, 3), 80, np.uint8)
        return [Keyframes(shot=r.shot.id, frames=[Frame(index=k, image=flat) for k in r.indices]) for r in requests]


def build_nap(settings: NapSettings, *, width: int, height: int) -> NapKeyframes:
    return NapKeyframes(width=width, height=height, nap_s=settings.nap_s)


@pytest.fixture
def nap():
    entry = registry.register(registry.Backend("keyframes", "nap", NapSettings, build=build_nap,
                                               calibration=lambda s: "nap"), replace=True)
    yield entry
    registry.unregister("keyframes", "nap")


def test_a_node_running_when_the_cap_is_reached_is_cancelled_and_billed_for_the_time_it_ran(
        nap, calibration, prices, tmp_path):
    row = CalibrationRow(stage="keyframes", backend="nap", device="cpu", unit="keyframe", overhead_s=0.0,
                         seconds_per_unit_mpx=0.01, source="test: the nap backend, far slower than this row",
                         measured_at="")
    plan = make_plan(EPISODE, Profile(name="nap", backend="nap", audit=False),
                     calibration=Calibration(rows=[*calibration.rows, row], paths=[]), prices=prices,
                     script_sha256=SHA)
    store = open_store(tmp_path / "store")
    boards = run(plan, store, prices, stop_after="storyboard")
    nap_yuan = prices.cost(NapSettings().nap_s, "cpu", 1.0)  # what one keyframes node really costs
    budget = boards.episode_spent_yuan + 0.25 * nap_yuan  # room for a chain on estimates, not for its nap
    result = run(plan, store, prices, budget_yuan=budget)
    assert result.cap_reached and result.stopped == "budget" and "storyboard.png" in result.outputs
    assert_within_cap(result, budget)
    cancelled = [n for n in result.cancelled if n.startswith("keyframes[")]
    assert cancelled and result.cancelled_yuan > 0
    # billed in this render's ledger and on record as the node's partial spend, its lease cleared
    book = episode_ledger(plan, store)
    notes = [n for n in book.notes if n.why == CANCELLED]
    assert {n.node for n in notes} == set(result.cancelled)
    assert sum(n.yuan for n in notes) == pytest.approx(result.cancelled_yuan)
    assert result.ledger.total_yuan == pytest.approx(sum(n.yuan for n in book.notes if n.holder == result.render_id))
    assert all(0 < n.yuan < nap_yuan for n in notes)  # stopped part-way through its nap
    assert all(current(store, n.key) is None for n in notes)
    assert result.episode_spent_yuan == pytest.approx(boards.episode_spent_yuan + result.ledger.total_yuan)
    # its row says it is partial time, so this cluster's calibration does not learn a keyframe costs that little
    shots = {n[len("keyframes["):-1] for n in cancelled}
    assert all(r.partial for r in result.ledger.records if r.stage == "keyframes" and r.shot in shots)
    assert not any(r.partial for r in result.ledger.records if r.shot not in shots)
    finished = {r.shot for r in result.ledger.records if r.stage == "keyframes" and not r.cached and not r.partial}
    assert not finished & shots
    taught = node_samples(plan, result.ledger)
    assert sum(len(pts) for (stage, *_), pts in taught.items() if stage == "keyframes") == len(finished)


# --------------------------------------------------------------------------- learn before widening: the storyboard


class NapBoardSettings(Record):
    nap_s: float = 0.5


class NapBoard:
    """A flat panel after a nap: a storyboard backend far slower than its calibration row says."""

    def __init__(self, *, width: int, aspect: str, nap_s: float):
        self.width, self.height, self.nap_s = width, round(width * (9 / 16 if aspect == "16:9" else 16 / 9)), nap_s

    def __call__(self, scene) -> np.ndarray:
        time.sleep(self.nap_s)
        return np.full((self.height, self.width, 3), 200, np.uint8)


@pytest.fixture
def napboard():
    entry = registry.register(registry.Backend(
        "storyboard", "napboard", NapBoardSettings,
        build=lambda s, *, width, aspect: NapBoard(width=width, aspect=aspect, nap_s=s.nap_s),
        calibration=lambda s: "napboard"), replace=True)
    yield entry
    registry.unregister("storyboard", "napboard")


def test_a_storyboard_the_first_panel_shows_the_budget_cannot_cover_is_not_started(napboard, calibration, prices,
                                                                                      tmp_path):
    """Its row says a panel is nearly free; the first panel, run alone, shows it is not: the other
    panels are never started, and the budget holds (no contact sheet: the storyboard did not fit)."""
    row = CalibrationRow(stage="storyboard", backend="napboard", device="cpu", unit="panel", overhead_s=0.0,
                         seconds_per_unit_mpx=0.001, source="test: the napboard backend, far slower than this row",
                         measured_at="")
    plan = make_plan(EPISODE, Profile(name="napboard", storyboard="napboard", audit=False), calibration=Calibration(rows=[*calibration.rows, row], paths=[]),
                     prices=prices, script_sha256=SHA)
    nap_yuan = prices.cost(NapBoardSettings().nap_s, "cpu", 1.0)
    budget = 2.5 * nap_yuan  # one panel's nap fits; five do not
    result = run(plan, open_store(tmp_path / "store"), prices, budget_yuan=budget)
    assert_within_cap(result, budget)
    assert result.stopped == "budget" and "storyboard.png" not in result.outputs
    boards = [r for r in result.ledger.records if r.stage == "storyboard" and not r.cached]
    assert len(boards) == 1  # the first panel alone: the others were never started
    if not result.cap_reached:  # it finished inside the budget, and taught the margin
        assert "its first panel ran" in result.budget_note


def test_the_voices_spoken_before_the_frames_keep_to_the_cap(calibration, prices, tmp_path):
    """``anim render`` speaks first (the cut follows the voice): under a budget the voices are spoken
    only when they fit, and what they cost counts against a render-scoped cap too."""
    from pipeline.dag import Cluster
    from pipeline.render import speak

    plan = make_plan(EPISODE, resolve_profile("draft"), calibration=calibration, prices=prices, script_sha256=SHA)
    assert plan.voices
    voices_yuan = sum(v.estimate_yuan for v in plan.voices)
    store = open_store(tmp_path / "store")
    # 1. A budget below the voices: nothing is spoken, and the render says so and spends nothing.
    silent = speak(plan, store=store, prices=prices, ffmpeg=FFMPEG, cluster=Cluster(), budget_yuan=voices_yuan / 10)
    assert not [r for r in silent.records if r.stage == "voice" and not r.cached]
    assert "voices" in (silent.budget_note or "") and episode_ledger(plan, store).total_yuan == 0.0
    # 2. Spoken under a render-scoped cap: the frames' guard starts from what the voices cost.
    budget = 10 * plan.estimated_cost_yuan
    spoken = speak(plan, store=store, prices=prices, ffmpeg=FFMPEG, cluster=Cluster(), budget_yuan=budget)
    paid = sum(r.yuan for r in spoken.records if not r.cached)
    assert paid > 0
    result = run(plan, store, prices, budget_yuan=budget, budget_scope="render", spoken=spoken)
    assert result.budget_spent_yuan == pytest.approx(result.ledger.total_yuan) and result.budget_spent_yuan >= paid
    assert result.spent_before_yuan == pytest.approx(0.0, abs=1e-12)  # the voices are this render's, not earlier
