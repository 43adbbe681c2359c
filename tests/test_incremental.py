"""Incremental re-render, damage recovery, budget guard and estimates — on a real local Ray cluster."""
from __future__ import annotations

import hashlib
import shutil
from collections import Counter

import imageio_ffmpeg
import pytest

from pipeline.calibration import Calibration
from pipeline.config import resolve_profile
from pipeline.cost import PriceCatalog
from pipeline.plan import make_plan
from pipeline.render import render
from pipeline.store import open_store
from stages.records import Episode
from stages.script import load_episode

from .conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
SHOTLIST = REPO / "examples" / "shotlist.yaml"


def plan_for(episode: Episode, prices: PriceCatalog, **overrides):
    return make_plan(episode, resolve_profile("draft", overrides), prices=prices,
                     calibration=Calibration.load(REPO / "cluster" / "calibration.csv"),
                     script_sha256=hashlib.sha256(episode.model_dump_json().encode()).hexdigest())


def run(plan, store, prices, **kw):
    return render(plan, store=store, prices=prices, ffmpeg=FFMPEG, **kw)


def executed(result) -> set[tuple[str, str | None]]:
    return {(r.stage, r.shot) for r in result.ledger.records if not r.cached}


def test_unchanged_rerender_costs_nothing(tmp_path, prices):
    store = open_store(tmp_path / "store")
    plan = plan_for(load_episode(SHOTLIST), prices)
    first = run(plan, store, prices)
    assert first.stopped is None and first.ledger.total_yuan > 0
    assert not any(r.cached for r in first.ledger.records)
    again = run(plan, store, prices)
    assert again.ledger.total_yuan == 0.0
    assert all(r.cached for r in again.ledger.records)
    assert {(r.stage, r.shot) for r in again.ledger.records} == {(r.stage, r.shot) for r in first.ledger.records}
    assert again.quality == first.quality  # the audit travels with the cached clip
    assert again.outputs["episode.mp4"].read_bytes() == first.outputs["episode.mp4"].read_bytes()


def test_one_shot_edit_recomputes_only_that_shot(tmp_path, prices):
    store = open_store(tmp_path / "store")
    episode = load_episode(SHOTLIST)
    run(plan_for(episode, prices), store, prices)
    scene = episode.scenes[0]
    target = scene.shots[1]
    edited_shot = target.model_copy(update={"action": target.action + " She smiles."})
    edited = episode.model_copy(update={"scenes": [scene.model_copy(update={
        "shots": [edited_shot if s.id == target.id else s for s in scene.shots]})] + episode.scenes[1:]})
    result = run(plan_for(edited, prices), store, prices)
    assert {shot for _, shot in executed(result)} == {target.id, None}
    assert {stage for stage, shot in executed(result) if shot == target.id} >= {"storyboard", "keyframes",
                                                                                 "inbetween", "encode"}


def test_profile_change_reruns_only_the_stages_it_affects(tmp_path, prices):
    store = open_store(tmp_path / "store")
    episode = load_episode(SHOTLIST)
    run(plan_for(episode, prices), store, prices)
    result = run(plan_for(episode, prices, crf=30), store, prices)  # an encoder setting
    stages = {stage for stage, _ in executed(result)}
    assert stages <= {"inbetween", "encode", "audit", "assemble", "mix", "subtitles"} and "encode" in stages
    assert all(r.cached for r in result.ledger.records if r.stage in ("storyboard", "keyframes"))


def test_damaged_entry_is_recomputed_never_used(tmp_path, prices):
    store = open_store(tmp_path / "store")
    plan = plan_for(load_episode(SHOTLIST), prices)
    run(plan, store, prices)
    victim = plan.shots[2]
    clip = store.get(victim.keys["clip"])["clip.mp4"]
    data = bytearray(clip.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    clip.write_bytes(bytes(data))
    shutil.rmtree(store.get(plan.shots[3].keys["keyframes"])["key_00000.png"].parent)  # a vanished entry
    result = run(plan, store, prices)
    assert {shot for stage, shot in executed(result) if stage == "encode"} == {victim.shot.id}
    assert ("keyframes", plan.shots[3].shot.id) not in executed(result)  # its clip was intact: not needed
    assert store.get(victim.keys["clip"]) is not None


def test_a_budget_below_every_chain_delivers_the_storyboard_and_resume_finishes(tmp_path, prices):
    """A budget whose part left after the storyboard is below every shot's chain, whatever this
    machine's speed: the storyboard pass is rendered first without a budget, so the budget can
    be set from what it really cost (the budget is the episode's: that spend counts), and a
    chain is reserved at no less than 1.25 × its estimate. The budgeted render starts no chain
    and still delivers the contact sheet; a resume with no budget recomputes exactly what
    remained. How far actual spend can pass a budget is tests/test_budget_cap.py."""
    store = open_store(tmp_path / "store")
    plan = plan_for(load_episode(SHOTLIST), prices)
    boards = run(plan, store, prices, stop_after="storyboard")
    spent = boards.episode_spent_yuan
    assert spent == pytest.approx(boards.ledger.total_yuan) and spent > 0
    cheapest = min(sum(s.estimate_yuan.values()) - s.estimate_yuan["storyboard"] for s in plan.shots)
    budget = spent + 1.25 * cheapest * 0.99
    first = run(plan, store, prices, budget_yuan=budget)
    assert first.stopped == "budget" and set(first.outputs) == {"storyboard.png"}
    assert not executed(first) and first.ledger.total_yuan == 0.0
    assert first.spent_before_yuan == pytest.approx(spent) and first.episode_spent_yuan == pytest.approx(spent)
    assert first.remaining == [s.shot.id for s in plan.shots] and first.remaining_estimate_yuan > 0
    resumed = run(plan, store, prices)
    assert resumed.stopped is None
    assert {shot for stage, shot in executed(resumed) if stage in ("keyframes", "encode")} == set(first.remaining)
    assert "storyboard" not in {stage for stage, _ in executed(resumed)}  # nothing finished is recomputed
    assert resumed.episode_spent_yuan == pytest.approx(spent + resumed.ledger.total_yuan)


def test_zero_budget_spends_nothing(tmp_path, prices):
    store = open_store(tmp_path / "store")
    result = run(plan_for(load_episode(SHOTLIST), prices), store, prices, budget_yuan=0.0)
    assert result.stopped == "budget" and result.ledger.total_yuan == 0.0 and not result.ledger.records


def test_storyboard_stop_and_approval_gate(tmp_path, prices):
    from pipeline.approvals import decide, gate_state, open_approvals

    store = open_store(tmp_path / "store")
    plan = plan_for(load_episode(SHOTLIST), prices, approval_gate=True)
    boards = run(plan, store, prices, stop_after="storyboard")
    assert boards.stopped == "storyboard" and set(boards.outputs) == {"storyboard.png"}
    assert {r.stage for r in boards.ledger.records if not r.cached} == {"storyboard", "voice"}  # the cut's timing
    book = open_approvals(tmp_path / "approvals.db")
    book.record(decide(plan, plan.shots[:2], "approved", by="test"))
    gated = run(plan, store, prices, approvals=gate_state(book, plan, True).approvals)
    assert gated.stopped == "approval"
    assert {shot for stage, shot in executed(gated) if stage == "keyframes"} == {s.shot.id for s in plan.shots[:2]}
    assert gated.remaining == [s.shot.id for s in plan.shots[2:]]


def test_ledger_and_estimate_cover_the_same_nodes(tmp_path, prices):
    """The estimate and the measurement of one render describe the same nodes, stage by stage.

    How close the estimate comes to the measured cost depends on the machine and its load: that
    is a benchmark, ``experiments/estimate_accuracy.py``, not a test."""
    plan = plan_for(load_episode(SHOTLIST), prices)
    result = run(plan, open_store(tmp_path / "store"), prices)
    records = result.ledger.records
    assert result.stopped is None and not any(r.cached for r in records)

    # Each executed node writes one row per stage it did work for: per shot the storyboard node, the
    # keyframes node (+ drawing the audit frame) and the clip node (in-betweens, encode, + comparing
    # the audit); then the assembly. The same (stage, shot) pairs are the ones the plan estimates.
    # The sound: a voice node per line, the mix and the burned-in subtitles inside the assembly.
    expected: Counter = Counter([("assemble", None), ("mix", None), ("subtitles", None)])
    expected.update(("voice", v.line.shot) for v in plan.voices)
    for s in plan.shots:
        audit = [("audit", s.shot.id)] if s.audit_frame is not None else []
        expected.update([("storyboard", s.shot.id), ("keyframes", s.shot.id), *audit,
                         ("inbetween", s.shot.id), ("encode", s.shot.id), *audit])
    assert Counter((r.stage, r.shot) for r in records) == expected
    assert set(expected) == ({(stage, s.shot.id) for s in plan.shots for stage in s.estimate_yuan}
                             | {("assemble", None), ("mix", None), ("subtitles", None)}
                             | {("voice", v.line.shot) for v in plan.voices})
    assert all(r.seconds > 0 and r.yuan > 0 and r.resource == "cpu" for r in records)
    assert result.ledger.total_yuan == pytest.approx(sum(result.ledger.by_stage().values()), rel=1e-12)

    # The estimate: positive for every node, summed per stage it is the plan's total, on the ledger's stages.
    by_stage = plan.estimate_by_stage()
    assert set(by_stage) == set(result.ledger.by_stage())
    assert all(y > 0 for s in plan.shots for y in s.estimate_yuan.values()) and plan.assemble_estimate_yuan > 0
    assert plan.estimated_cost_yuan > 0
    assert plan.estimated_cost_yuan == pytest.approx(sum(by_stage.values()), rel=1e-12)
    for stage in by_stage:
        per_node = [s.estimate_yuan[stage] for s in plan.shots if stage in s.estimate_yuan]
        assert by_stage[stage] == pytest.approx(sum(per_node) + plan.episode_estimate_yuan.get(stage, 0.0), rel=1e-12)
