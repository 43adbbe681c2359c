"""Approvals are producer decisions, not cache: their own database (who, when, why; approve and
reject; latest wins, history kept), keyed by the shot's content and aspect so a draft approval
holds at standard and on a GPU profile, a gate on by default where keyframes cost GPU money,
and — through the CLI on a real local Ray cluster — a gated render that publishes the finished
shots, logs the gate to MLflow, and whose decisions survive ``anim cache gc`` of everything."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone

import mlflow
import pytest
from typer.testing import CliRunner

from pipeline.approvals import (ApprovalError, approval_key, decide, earlier_key, gate_on, gate_state, open_approvals,
                                preview_clips)
from pipeline.calibration import Calibration
from pipeline.cli import app
from pipeline.config import resolve_profile, resolve_settings
from pipeline.plan import make_plan
from pipeline.schedule import NodeId, schedule
from pipeline.store import open_store
from stages.records import Episode
from stages.script import load_episode

from .conftest import REPO

SHOTLIST = REPO / "examples" / "shotlist.yaml"
GPU_PROFILE = str(REPO / "examples" / "profiles" / "standard_gpu.toml")


def plan_at(profile: str, prices, episode: Episode | None = None, **overrides):
    episode = episode or load_episode(SHOTLIST)
    return make_plan(episode, resolve_profile(profile, overrides), prices=prices,
                     calibration=Calibration.load(REPO / "cluster" / "calibration.csv"),
                     script_sha256=hashlib.sha256(episode.model_dump_json().encode()).hexdigest())


def edited(episode: Episode, shot_id: str, action: str | None = None, **fields) -> Episode:
    """The episode with one shot's action (or other ``fields``) rewritten."""
    data = episode.model_dump()
    for scene in data["scenes"]:
        for shot in scene["shots"]:
            if shot["id"] == shot_id:
                shot.update({"action": action} if action is not None else {}, **fields)
    return Episode.model_validate(data)


# --------------------------------------------------------------------------- the database


def test_latest_decision_wins_and_every_decision_is_kept(tmp_path, prices):
    book = open_approvals(tmp_path / "team" / "approvals.db")
    plan = plan_at("draft", prices)
    shot = plan.shots[1]
    t0 = datetime(2025, 3, 1, 9, 30, tzinfo=timezone(timedelta(hours=8)))  # a producer in Shanghai
    book.record(decide(plan, [shot], "approved", by="lin", comment="good staging", at=t0))
    book.record(decide(plan, [shot], "rejected", by="kai", comment="Mei faces the wrong way",
                       at=t0 + timedelta(hours=1)))

    latest = book.latest([approval_key(shot, "16:9"), "no-such-key"])
    assert list(latest) == [approval_key(shot, "16:9")]
    d = latest[approval_key(shot, "16:9")]
    assert (d.decision, d.by, d.comment, d.shot) == ("rejected", "kai", "Mei faces the wrong way", shot.shot.id)
    assert d.at == datetime(2025, 3, 1, 2, 30, tzinfo=timezone.utc)  # stored and read back in UTC
    assert (d.title, d.script_sha256, d.profile, d.storyboard_key) == (
        plan.title, plan.script_sha256, "draft", shot.keys["storyboard"])
    # History keeps both, oldest first, in a second connection to the same file.
    again = open_approvals(tmp_path / "team" / "approvals.db")
    assert [(h.decision, h.by) for h in again.history([d.key])] == [("approved", "lin"), ("rejected", "kai")]
    assert len(again.history()) == 2
    # A later approval wins over the rejection.
    again.record(decide(plan, [shot], "approved", by="lin", comment="fixed in the re-board"))
    assert book.latest([d.key])[d.key].decision == "approved"


def test_reading_creates_nothing_and_a_bad_folder_is_one_line(tmp_path, prices):
    plan = plan_at("draft", prices)
    where = tmp_path / "not-yet" / "approvals.db"
    book = open_approvals(where)
    assert gate_state(book, plan, True).counts()["pending"] == len(plan.shots) and book.history() == []
    assert not where.parent.exists()  # `anim plan` leaves no database behind
    book.record(decide(plan, plan.shots[:1], "approved", by="lin"))
    assert where.is_file() and len(open_approvals(where).history()) == 1
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ApprovalError, match="cannot create its folder"):
        open_approvals(tmp_path / "a-file" / "approvals.db").record(decide(plan, plan.shots[:1], "approved", by="x"))


def test_a_decision_names_who_and_a_rejection_says_why(tmp_path, prices):
    plan = plan_at("draft", prices)
    with pytest.raises(ApprovalError, match="rejection needs a comment"):
        decide(plan, plan.shots[:1], "rejected", by="lin")
    with pytest.raises(ApprovalError, match="who made it"):
        decide(plan, plan.shots[:1], "approved", by="  ")
    with pytest.raises(ApprovalError, match="nosuch://"):
        open_approvals("nosuch://somewhere/approvals")
    with pytest.raises(ApprovalError, match=r"u:\*\*\*@") as caught:  # the password is never printed
        open_approvals("postgresql+nosuchdriver://u:secret@db.example/anim")
    assert "secret" not in str(caught.value)


def test_the_approvals_location_is_a_setting(tmp_path):
    env = {"HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "data"),
           "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    studio = tmp_path / "etc" / "config.toml"
    s = resolve_settings(env, studio_file=studio)
    assert s.approvals == str(tmp_path / "data" / "anim-pipeline" / "approvals.db")
    assert not s.approvals.startswith(s.store)  # apart from the artifact store
    studio.parent.mkdir()
    studio.write_text('approvals = "decisions/approvals.db"\n')
    assert resolve_settings(env, studio_file=studio).approvals == str(studio.parent / "decisions" / "approvals.db")
    url = "postgresql://render-db/anim"
    s = resolve_settings(env | {"ANIM_APPROVALS": url}, studio_file=studio)
    assert s.approvals == url and s.sources["approvals"] == "$ANIM_APPROVALS"


# --------------------------------------------------------------------------- the key and the gate


def test_the_key_follows_content_and_aspect_not_profile_or_gpu(prices):
    draft, standard, gpu = plan_at("draft", prices), plan_at("standard", prices), plan_at(GPU_PROFILE, prices)
    keys = [approval_key(s, "16:9") for s in draft.shots]
    assert len(set(keys)) == len(keys)
    # Panel width, profile, keyframe backend and GPU differ; the decision keys do not.
    assert draft.profile.storyboard_width != standard.profile.storyboard_width
    assert [s.keys["storyboard"] for s in draft.shots] != [s.keys["storyboard"] for s in standard.shots]
    assert [approval_key(s, p.profile.aspect) for p in (standard, gpu) for s in p.shots] == keys * 2
    # The aspect changes the composition: another decision.
    vertical = plan_at("draft", prices, aspect="9:16")
    assert not {approval_key(s, "9:16") for s in vertical.shots} & set(keys)
    # Editing one shot's action changes that shot's key only.
    changed = plan_at("draft", prices, edited(load_episode(SHOTLIST), "sc01-sh03", "Mei blows the flame out."))
    new = [approval_key(s, "16:9") for s in changed.shots]
    assert [a == b for a, b in zip(keys, new)] == [s.shot.id != "sc01-sh03" for s in draft.shots]
    # A dissolve written after a shot re-draws its panel (the panel prints it) but keeps its decision.
    dissolve = plan_at("draft", prices, edited(load_episode(SHOTLIST), "sc01-sh03", transition_out="DISSOLVE TO:"))
    assert [approval_key(s, "16:9") for s in dissolve.shots] == keys
    assert [a.keys["storyboard"] == b.keys["storyboard"] for a, b in zip(draft.shots, dissolve.shots)] == \
        [s.shot.id != "sc01-sh03" for s in draft.shots]


def test_the_gate_is_on_where_keyframes_cost_gpu_money(prices):
    draft, gpu = resolve_profile("draft"), resolve_profile(GPU_PROFILE)
    assert gpu.resources("keyframes").gpus > 0 and draft.resources("keyframes").gpus == 0
    assert (gate_on(draft), gate_on(gpu)) == (False, True)
    assert (gate_on(draft, True), gate_on(gpu, False)) == (True, False)  # --approval-gate / --no-approval-gate
    assert gate_on(gpu.replace(approval_gate=False)) is False  # the profile's own default
    assert gate_on(draft.replace(approval_gate=True)) is True
    assert gate_on(draft.replace(approval_gate=True), False) is False  # the flag wins


def test_draft_approvals_pass_the_gate_at_standard_and_on_a_gpu(tmp_path, prices):
    book = open_approvals(tmp_path / "approvals.db")
    store = open_store(tmp_path / "store")
    draft = plan_at("draft", prices)
    picked = [s.shot.id for s in draft.shots[1:3]]
    book.record(decide(draft, draft.shots[1:3], "approved", by="lin", comment="ok"))
    book.record(decide(draft, draft.shots[3:4], "rejected", by="lin", comment="too dark"))

    for plan in (plan_at("standard", prices), plan_at(GPU_PROFILE, prices)):
        state = gate_state(book, plan, gate_on(plan.profile, True))
        sched = schedule(plan, store, approvals=state.approvals)
        assert sched.shots_to_render == picked
        assert sched.stopped == "approval"
        # A rejected shot is held back like a pending one.
        assert {s.shot: s.state for s in state.shots if s.shot not in picked} == {
            draft.shots[0].shot.id: "pending", draft.shots[3].shot.id: "rejected", draft.shots[4].shot.id: "pending"}
        assert sched[NodeId("keyframes", draft.shots[3].shot.id)].reason == "approval"
        assert state.counts() == {"approved": 2, "rejected": 1, "pending": 2}

    # Edit an approved shot's action: it needs approval again; the other stays approved.
    episode = edited(load_episode(SHOTLIST), picked[0], "Mei drops the lantern into the river.")
    after = plan_at("standard", prices, episode)
    state = gate_state(book, after, True)
    assert state[picked[0]].state == "pending" and state[picked[1]].state == "approved"
    assert schedule(after, store, approvals=state.approvals).shots_to_render == [picked[1]]
    # A decision kept before transitions left the key (under the shot's whole content) still holds
    # for a shot with a transition, and the shot's next decision is kept under its new key.
    undecided = draft.shots[4].shot.id
    cut = plan_at("draft", prices, edited(load_episode(SHOTLIST), undecided, transition_out="CUT TO:"))
    shot = next(s for s in cut.shots if s.shot.id == undecided)
    old = decide(cut, [shot], "rejected", by="kai", comment="before the key changed")[0]
    book.record([old.model_copy(update={"key": earlier_key(shot, "16:9")})])
    assert earlier_key(shot, "16:9") != approval_key(shot, "16:9")
    assert gate_state(book, cut, True)[undecided].state == "rejected"
    book.record(decide(cut, [shot], "approved", by="kai", comment="now"))
    assert gate_state(book, cut, True)[undecided].state == "approved"
    assert book.latest([approval_key(shot, "16:9")])[approval_key(shot, "16:9")].comment == "now"
    # The gate off: nothing is held, whatever was decided.
    off = gate_state(book, after, False)
    assert off.approvals is None and len(schedule(after, store, approvals=off.approvals).shots_to_render) == 5


def test_gate_state_as_mlflow_tags_and_json(tmp_path, prices):
    book = open_approvals(tmp_path / "approvals.db")
    plan = plan_at("draft", prices)
    book.record(decide(plan, plan.shots[:1], "rejected", by="kai", comment="wrong lantern colour"))
    state = gate_state(book, plan, True)
    tags = state.tags()
    assert tags["approval_gate"] == "on"
    assert (tags["approvals.approved"], tags["approvals.rejected"], tags["approvals.pending"]) == ("0", "1", "4")
    assert tags[f"approval.{plan.shots[0].shot.id}"] == "rejected"
    assert {tags[f"approval.{s.shot.id}"] for s in plan.shots[1:]} == {"pending"}
    summary = json.loads(json.dumps(state.summary()))
    first = summary["shots"][0]
    assert (first["state"], first["by"], first["comment"]) == ("rejected", "kai", "wrong lantern colour")
    assert datetime.fromisoformat(first["at"]).tzinfo is not None
    assert "by" not in summary["shots"][1] and summary["counts"]["pending"] == 4


# --------------------------------------------------------------------------- through the CLI, rendering for real


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """``anim`` in this process, in an environment of its own under tmp_path."""
    monkeypatch.chdir(tmp_path)
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "COLUMNS": "200",
           **{k: None for k in ("RAY_ADDRESS", "ANIM_STORE", "ANIM_APPROVALS", "ANIM_CONFIG", "ANIM_PRICES",
                                "ANIM_CALIBRATION", "ANIM_PRICE_TIER", "ANIM_PRICE_PROVIDER", "ANIM_DEBUG")}}
    runner = CliRunner()

    def anim(*args: str, code: int = 0, **extra: str):
        res = runner.invoke(app, [str(a) for a in args], env=env | extra)
        assert res.exit_code == code, res.output
        assert "Traceback" not in res.output
        return res.output

    return anim


def decisions(table: str) -> dict[str, str]:
    """shot -> decision, from the table ``anim approve`` prints."""
    rows = [[c.strip() for c in line.split("│")] for line in table.splitlines() if line.startswith("│ sc")]
    return {cells[1]: cells[2] for cells in rows}


def test_cli_refuses_bad_decisions_in_one_line(tmp_path, cli):
    # No panel rendered yet: the producer has not seen it.
    msg = cli("approve", SHOTLIST, "--shot", "sc01-sh01", code=2)
    assert "no storyboard panel yet for sc01-sh01" in msg and len(msg.strip().splitlines()) == 1
    assert "no shot sc09-sh09" in cli("approve", SHOTLIST, "--shot", "sc09-sh09", code=2)
    assert "--shot ID" in cli("approve", SHOTLIST, code=2)
    assert "--list shows" in cli("approve", SHOTLIST, "--list", "--shot", "sc01-sh01", code=2)
    msg = cli("approve", SHOTLIST, "--list", code=2, ANIM_APPROVALS="nosuch://db")
    assert "approvals database nosuch://db" in msg and len(msg.strip().splitlines()) == 1
    # Listing records nothing: every shot is pending.
    listed = cli("approve", SHOTLIST, "--list")
    assert set(decisions(listed).values()) == {"pending"} and len(decisions(listed)) == 5
    assert "gate is off for profile draft" in listed


@pytest.mark.slow
def test_gated_render_previews_finished_shots_logs_the_gate_and_survives_gc(tmp_path, prices, cli, local_ray):
    out = tmp_path / "out"
    # 1. Storyboard only; the producer approves two panels and rejects one.
    cli("render", SHOTLIST, "--stop-after", "storyboard", "--out", out, "--no-progress")
    cli("approve", SHOTLIST, "-s", "sc01-sh01", "-s", "sc01-sh02", "-m", "good staging", "--by", "lin")
    assert "rejection needs a comment" in cli("approve", SHOTLIST, "--reject", "-s", "sc01-sh03", code=2)
    listed = cli("approve", SHOTLIST, "--reject", "-s", "sc01-sh03", "-m", "eyes too small", "--by", "kai")
    assert decisions(listed) == {"sc01-sh01": "approved", "sc01-sh02": "approved", "sc01-sh03": "rejected",
                                 "sc02-sh01": "pending", "sc02-sh02": "pending"} and "eyes too small" in listed

    # 2. The gate (a flag: draft runs on CPUs) renders the approved shots only and stops (exit 3).
    plan_text = cli("plan", SHOTLIST, "--approval-gate")
    assert "held (rejected)" in plan_text and plan_text.count("held (pending)") == 2
    report = cli("render", SHOTLIST, "--approval-gate", "--out", out, "--no-progress", code=3)
    assert "waiting for storyboard approval" in report and "2 finished shots to preview" in report
    files = {p.name for p in out.iterdir()}
    assert {"storyboard.png", "shot-sc01-sh01.mp4", "shot-sc01-sh02.mp4", "approvals.json"} <= files
    assert not {f for f in files if f.startswith("shot-")} - {"shot-sc01-sh01.mp4", "shot-sc01-sh02.mp4"}
    assert "episode.mp4" not in files and (out / "shot-sc01-sh01.mp4").stat().st_size > 0
    published = json.loads((out / "approvals.json").read_text())
    assert published["gate"] is True and published["counts"] == {"approved": 2, "rejected": 1, "pending": 2}

    # 3. The gate's state is on the MLflow run.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"], output_format="list")[0]
    tags = run.data.tags
    assert (tags["status"], tags["approval_gate"], tags["approvals.approved"], tags["approvals.rejected"]) == (
        "approval", "on", "2", "1")
    assert (tags["approval.sc01-sh02"], tags["approval.sc01-sh03"], tags["approval.sc02-sh01"]) == (
        "approved", "rejected", "pending")

    # 4. gc of everything in the artifact store leaves every decision where it was.
    cli("cache", "gc", "--max-size", "0")
    assert open_store(tmp_path / "cache" / "anim-pipeline" / "store").stats().entries == 0
    listed = cli("approve", SHOTLIST, "--list")
    assert list(decisions(listed).values()) == ["approved", "approved", "rejected", "pending", "pending"]
    assert "eyes too small" in listed and "lin" in listed
    summary = json.loads(cli("plan", SHOTLIST, "--profile", "standard", "--approval-gate", "--json"))
    assert summary["schedule"]["shots_to_render"] == ["sc01-sh01", "sc01-sh02"]  # at standard too
    assert [s["state"] for s in summary["approvals"]["shots"]] == ["approved", "approved", "rejected", "pending",
                                                                   "pending"]
    # With the clips gone too, a stopped render has nothing to preview: nothing is faked.
    assert preview_clips(plan_at("draft", prices), open_store(tmp_path / "cache" / "anim-pipeline" / "store")) == {}
