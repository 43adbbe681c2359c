"""The pure scheduler against a real local store: hits, held back (stop point, approval,
budget) and what must run, each with its estimate — without Ray."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.config import resolve_profile
from pipeline.plan import make_plan
from pipeline.schedule import NodeId, contact_sheet_estimate, schedule
from pipeline.store import open_store
from stages.script import load_episode

from .conftest import REPO
from .test_keys import any_calibration

EPISODE = load_episode(REPO / "examples" / "shotlist.yaml")


@pytest.fixture
def plan(calibration, prices):
    return make_plan(EPISODE, resolve_profile("draft"), calibration=calibration, prices=prices, script_sha256="0" * 64)


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path / "store")


def put(store, key: str) -> None:
    with store.writer(key, {"stage": "test"}) as d:
        (d / "x.bin").write_bytes(b"x")


def test_a_cold_store_runs_every_node_at_the_plan_estimate(plan, store):
    sched = schedule(plan, store)
    assert not sched.where("hit") and not sched.where("held")
    assert sched.stopped is None and sched.finish == NodeId("assemble")
    assert sched.shots_to_render == [s.shot.id for s in plan.shots]
    assert sched.estimate_yuan == pytest.approx(plan.estimated_cost_yuan)
    # every chain is storyboard -> keyframes -> clip, and assemble reads every clip
    first = plan.shots[0].shot.id
    assert sched[NodeId("clip", first)].inputs == (NodeId("keyframes", first),)
    assert sched[NodeId("assemble")].inputs == (tuple(NodeId("clip", s.shot.id) for s in plan.shots)
                                                + tuple(NodeId("voice", v.id) for v in plan.voices))


def test_a_stored_clip_makes_its_whole_chain_free(plan, store):
    done = plan.shots[1]
    put(store, done.keys["clip"])
    put(store, done.keys["storyboard"])
    sched = schedule(plan, store)
    assert {n.id for n in sched.where("hit")} == {NodeId(s, done.shot.id) for s in ("storyboard", "keyframes", "clip")}
    assert done.shot.id not in sched.shots_to_render and len(sched.shots_to_render) == len(plan.shots) - 1
    saved = sum(done.estimate_yuan.values())
    assert sched.estimate_yuan == pytest.approx(plan.estimated_cost_yuan - saved)


def test_stored_keyframes_leave_only_the_clip_to_run(plan, store):
    shot = plan.shots[0]
    put(store, shot.keys["keyframes"])
    sched = schedule(plan, store)
    assert sched[NodeId("keyframes", shot.shot.id)].state == "hit"
    assert sched[NodeId("clip", shot.shot.id)].state == "run"


def test_stop_after_storyboard_holds_every_chain_and_ends_with_the_contact_sheet(plan, store):
    sched = schedule(plan, store, stop_after="storyboard")
    assert {n.reason for n in sched.where("held")} == {"storyboard"}
    assert len(sched.where("run", "storyboard")) == len(plan.shots)
    assert sched.finish == NodeId("contact_sheet") and sched.stopped == "storyboard"
    assert sched[NodeId("contact_sheet")].state == "run"
    with pytest.raises(ValueError, match="the only stop is 'storyboard'"):
        schedule(plan, store, stop_after="keyframes")


def test_the_approval_gate_runs_only_approved_shots(plan, store):
    approved = plan.shots[2]
    sched = schedule(plan, store, approvals={approved.keys["storyboard"]})
    assert sched.shots_to_render == [approved.shot.id]
    assert sched.stopped == "approval"
    assert set(sched.held_shots()) == {s.shot.id for s in plan.shots} - {approved.shot.id}
    assert schedule(plan, store, approvals=set()).shots_to_render == []


def test_the_budget_admits_storyboards_and_their_contact_sheet_together_then_chains_longest_first(plan, store):
    boards = sum(s.estimate_yuan["storyboard"] for s in plan.shots)
    sheet = contact_sheet_estimate(plan)
    assert sheet > 0
    # not even the storyboards and the sheet fit: nothing is spent
    nothing = schedule(plan, store, budget_yuan=1.25 * (boards + sheet) * 0.999)
    assert not nothing.where("run") and nothing.stopped == "budget"
    assert nothing[NodeId("contact_sheet")].state == "held"
    # they fit: the storyboard pass and its sheet run, every chain is held
    board_pass = schedule(plan, store, budget_yuan=1.25 * (boards + sheet) * 1.0001)
    assert {n.id.stage for n in board_pass.where("run")} == {"storyboard", "contact_sheet"}
    # storyboards, the sheet and the single most expensive chain fit, with the 1.25 margin
    chains = {s.shot.id: sum(s.estimate_yuan.values()) - s.estimate_yuan["storyboard"] for s in plan.shots}
    longest = max(plan.shots, key=lambda s: sum(s.estimate_seconds.values())).shot.id
    budget = 1.25 * (boards + sheet + chains[longest]) * 1.0001
    some = schedule(plan, store, budget_yuan=budget)
    assert some.shots_to_render == [longest]
    assert some.stopped == "budget" and some.finish == NodeId("contact_sheet")
    assert some[NodeId("contact_sheet")].state == "run"
    assert sum(n.estimate_yuan for n in some.where("run")) * 1.25 <= budget
    # held chains keep their estimates: what remains is priced
    assert all(n.estimate_yuan > 0 for n in some.where("held", "clip"))
    # everything fits: no stop, and the episode (with its own sheet) replaces the contact sheet
    full = schedule(plan, store, budget_yuan=10 * plan.estimated_cost_yuan)
    assert full.stopped is None and full.finish == NodeId("assemble") and full.get(NodeId("contact_sheet")) is None


def test_what_the_episode_spent_before_counts_against_its_budget(plan, store):
    budget = 10 * plan.estimated_cost_yuan
    assert schedule(plan, store, budget_yuan=budget, spent_yuan=0.5 * budget).stopped is None
    spent_most = schedule(plan, store, budget_yuan=budget, spent_yuan=budget - 0.5 * plan.estimated_cost_yuan)
    assert spent_most.stopped == "budget" and 0 < len(spent_most.shots_to_render) < len(plan.shots)
    spent_all = schedule(plan, store, budget_yuan=budget, spent_yuan=budget)
    assert not spent_all.where("run") and spent_all.stopped == "budget"


def test_layered_plates_run_once_per_location_and_are_no_hits_on_a_cold_store(prices, store):
    profile = resolve_profile(str(REPO / "examples" / "profiles" / "standard_gpu.toml"))
    plan = make_plan(EPISODE, profile, calibration=any_calibration(profile), prices=prices, script_sha256="0" * 64)
    sched = schedule(plan, store)
    plates = sched.where("run", "plates")
    assert len(plates) == len(plan.plates) > 0 and not sched.where("hit", "plates")
    assert len(sched.where("run", "sheets")) == len(plan.sheets)
    order = [n.id.stage for n in sched.nodes]
    assert order.index("plates") < order.index("keyframes")
    put(store, plates[0].key)
    again = schedule(plan, store)
    assert again[plates[0].id].state == "hit" and len(again.where("run", "plates")) == len(plates) - 1


def test_anim_plan_prints_what_a_render_would_recompute_now(plan, tmp_path):
    """The CLI plans against the store: the same plan's keys, so storing one clip removes one shot."""
    env = {**os.environ, "ANIM_STORE": str(tmp_path / "store"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    script = str(REPO / "examples" / "shotlist.yaml")

    def anim_plan(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", "plan", script, *extra], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    cold = json.loads(anim_plan("--json").stdout)
    assert len(cold["schedule"]["shots_to_render"]) == len(cold["shots"])
    assert cold["schedule"]["estimated_cost_yuan"] == pytest.approx(cold["estimated_cost_yuan"])
    store = open_store(tmp_path / "store")
    put(store, plan.shots[0].keys["clip"])
    warm = json.loads(anim_plan("--json").stdout)
    assert warm["schedule"]["shots_to_render"] == [s["id"] for s in cold["shots"][1:]]
    assert warm["schedule"]["estimated_cost_yuan"] < cold["schedule"]["estimated_cost_yuan"]
    text = anim_plan().stdout
    assert f"re-render now: {len(cold['shots']) - 1} of {len(cold['shots'])} shots" in " ".join(text.split())
