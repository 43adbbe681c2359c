"""Spend is never lost and each node is computed once (#11.6): leases per content key, spend notes
beside the artifacts, the episode's ledger across renders — a killed render's spend counts when
it resumes, and two renders of one script at once compute and bill every node once."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter

import imageio_ffmpeg
import pytest

from pipeline import ledger
from pipeline.calibration import Calibration
from pipeline.config import resolve_profile
from pipeline.ledger import DIED, FAILED, SPEND, Claim, Timing, Work, claimed, episode_ledger
from pipeline.plan import make_plan
from pipeline.registry import Resources
from pipeline.render import render
from pipeline.schedule import LEDGER_STAGES, NodeId
from pipeline.store import Lease, LeaseInfo, open_store
from pipeline.store.lease import LEASES, current, try_acquire
from stages.script import load_episode

from .conftest import REPO

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
SHOTLIST = REPO / "examples" / "shotlist.yaml"
KEY = "ab" * 32


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(tmp_path / "store")
    return open_store(f"memory://anim-spend-{uuid.uuid4().hex[:12]}", local_cache=tmp_path / "rt")


def put(store, key: str) -> None:
    with store.writer(key, {"stage": "test"}) as d:
        (d / "x.bin").write_bytes(b"x")


def plan_for(prices):
    episode = load_episode(SHOTLIST)
    return make_plan(episode, resolve_profile("draft"), prices=prices,
                     calibration=Calibration.load(REPO / "cluster" / "calibration.csv"),
                     script_sha256=hashlib.sha256(episode.model_dump_json().encode()).hexdigest())


def executed(result) -> Counter:
    return Counter((r.stage, r.shot) for r in result.ledger.records if not r.cached)


# --------------------------------------------------------------------------- leases, no Ray


def test_one_taker_holds_a_key_and_the_next_sees_its_live_lease(store):
    first = try_acquire(store, KEY, holder="render-a", ttl_s=30, info={"node": "clip[x]"})
    assert isinstance(first, Lease) and first.took_over is None
    second = try_acquire(store, KEY, holder="render-b", ttl_s=30)
    assert isinstance(second, LeaseInfo) and second.holder == "render-a" and not second.expired()
    assert current(store, KEY).info == {"node": "clip[x]"}
    first.release()
    first.release()  # twice is once: it must not remove a lease another holder took meanwhile
    assert current(store, KEY) is None
    third = try_acquire(store, KEY, holder="render-b", ttl_s=30)
    assert isinstance(third, Lease) and current(store, KEY).holder == "render-b"


def test_a_dead_holders_lease_expires_and_is_taken_over_with_what_it_held(store):
    dead = try_acquire(store, KEY, holder="render-dead", ttl_s=0.3, info={"resource": "cpu", "units": 1.0})
    assert isinstance(dead, Lease)  # never kept alive: its holder "died" holding it
    time.sleep(0.4)
    assert current(store, KEY).expired()
    taker = try_acquire(store, KEY, holder="render-b", ttl_s=30)
    assert isinstance(taker, Lease) and taker.took_over is not None
    assert taker.took_over.holder == "render-dead" and taker.generation == taker.took_over.generation + 1
    assert store.notes(LEASES, KEY) == [f"{taker.generation:08d}"]  # the dead generation is tidied away
    dead.release()  # a holder that comes back after losing its lease removes nothing of the new one
    assert dead.lost and current(store, KEY).holder == "render-b"


def test_a_kept_alive_lease_outlives_its_ttl_and_a_garbled_one_does_not_block(store):
    held = try_acquire(store, KEY, holder="render-a", ttl_s=0.45).keep_alive()
    time.sleep(1.0)  # two ttl: renewed every third of it
    assert isinstance(try_acquire(store, KEY, holder="render-b", ttl_s=30), LeaseInfo)
    held.release()
    store.write_note(LEASES, KEY, "00000007", b"{half a lea")  # a holder killed mid-write
    taker = try_acquire(store, KEY, holder="render-b", ttl_s=30)
    assert isinstance(taker, Lease) and taker.generation == 8


def test_of_racing_takers_exactly_one_wins(tmp_path):
    store = open_store(tmp_path / "store")
    results, start = [], threading.Barrier(6)

    def take(i: int) -> None:
        start.wait()
        results.append(try_acquire(open_store(tmp_path / "store"), KEY, holder=f"r{i}", ttl_s=30))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, Lease)]
    assert len(winners) == 1 and all(r.holder == winners[0].info.holder for r in results if isinstance(r, LeaseInfo))
    assert current(store, KEY).holder == winners[0].info.holder


# --------------------------------------------------------------------------- a node's claim, no Ray


def work_for(store, prices, holder="render-b", **kw) -> Work:
    return Work(store=store.url, holder=holder, prices=prices, **kw)


def test_a_claim_on_a_stored_key_is_a_hit_and_takes_no_lease(store, prices):
    put(store, KEY)
    with claimed(work_for(store, prices), NodeId("clip", "s1"), KEY) as claim:
        assert claim.taken
    assert current(store, KEY) is None and store.notes(SPEND, KEY) == []


def test_a_claim_waits_for_the_holder_and_takes_its_artifact(store, prices):
    other = try_acquire(store, KEY, holder="render-a", ttl_s=30).keep_alive()

    def finish() -> None:
        time.sleep(0.6)
        put(store, KEY)
        other.release()

    threading.Thread(target=finish).start()
    t0 = time.monotonic()
    with claimed(work_for(store, prices), NodeId("clip", "s1"), KEY) as claim:
        assert claim.taken  # made by render-a: a hit, nothing billed here
    assert time.monotonic() - t0 >= 0.5 and store.notes(SPEND, KEY) == []


def test_a_claim_over_a_dead_holder_bills_the_time_it_held_the_key(store, prices):
    dead = try_acquire(store, KEY, holder="render-dead", ttl_s=0.2,
                       info={"resource": "cpu", "units": 2.0, "share": 1.0})
    dead.info = LeaseInfo(KEY, dead.generation, "render-dead", dead.info.started - 10.0, dead.info.started,
                          0.2, dead.info.info)  # it started 10 s before its last heartbeat
    store.write_note(LEASES, KEY, f"{dead.generation:08d}", dead.info.dump())
    time.sleep(0.3)
    with claimed(work_for(store, prices), NodeId("clip", "s1"), KEY) as claim:
        assert not claim.taken and claim.lease.took_over.holder == "render-dead"
    [note] = episode_notes(store, KEY)
    assert note.why == DIED and note.holder == "render-dead"
    assert [(r.stage, r.shot, r.resource, r.units) for r in note.rows] == [("inbetween", "s1", "cpu", 2.0)]
    # from its start to the heartbeat it missed: its last renewal plus a third of its ttl
    assert note.rows[0].seconds == pytest.approx(10.0 + 0.2 / 3)
    assert note.yuan == pytest.approx(prices.cost(10.0 + 0.2 / 3, "cpu", 2.0))


def test_a_claims_spend_is_recorded_before_its_commit_and_a_wait_is_bounded(store, prices):
    node = NodeId("keyframes", "s1")
    with claimed(work_for(store, prices), node, KEY) as claim:
        claim.spend([Timing("keyframes", 2.0), Timing("audit", 0.5)])
        [note] = episode_notes(store, KEY)  # on record before any artifact exists
        assert store.get(KEY) is None and note.why is None and note.holder == "render-b"
        assert note.yuan == pytest.approx(prices.cost(2.5, "cpu", 1.0))
        with pytest.raises(Exception, match="waited 0 s for render render-b"):
            with claimed(work_for(store, prices, holder="render-c", wait_s=0.0), node, KEY):
                pass
    assert current(store, KEY) is None


def test_a_node_that_fails_bills_the_time_it_ran_once(store, prices):
    with pytest.raises(ZeroDivisionError):
        with claimed(work_for(store, prices), NodeId("clip", "s1"), KEY):
            time.sleep(0.05)
            1 / 0
    [note] = episode_notes(store, KEY)
    assert note.why == FAILED and note.rows[0].stage == "inbetween" and note.rows[0].seconds >= 0.05
    assert current(store, KEY) is None  # released: the next render computes it
    other = "cd" * 32
    with pytest.raises(ZeroDivisionError):  # failed after its spend was on record: billed once, not twice
        with claimed(work_for(store, prices), NodeId("clip", "s2"), other) as claim:
            claim.spend([Timing("inbetween", 1.0)])
            1 / 0
    # ... by its note's rows, no longer a finished note: no artifact came of it
    [note] = episode_notes(store, other)
    assert note.why == FAILED and [r.seconds for r in note.rows] == [1.0]


def dead_after_its_note(store, prices, *, committed: bool) -> None:
    """A holder that wrote its spend note and died (its lease left to expire), before its commit
    or after it."""
    claim = Claim(work_for(store, prices, holder="render-dead", lease_s=0.2), store, NodeId("clip", "s1"), KEY,
                  Resources())
    assert isinstance(claim.take(), Lease)
    claim.lease._stop.set()  # its heartbeat dies with it
    claim.spend([Timing("inbetween", 3.0)])
    if committed:
        put(store, KEY)
    time.sleep(0.3)


def test_a_holder_dead_between_its_note_and_its_commit_is_billed_its_rows_once_as_partial(store, prices):
    dead_after_its_note(store, prices, committed=False)
    with claimed(work_for(store, prices), NodeId("clip", "s1"), KEY) as claim:
        assert not claim.taken  # the artifact never landed: computed again
        claim.spend([Timing("inbetween", 2.0)])
        put(store, KEY)
    notes = {n.holder: n for n in episode_notes(store, KEY)}
    assert notes["render-dead"].why == DIED and [r.seconds for r in notes["render-dead"].rows] == [3.0]
    assert notes["render-b"].why is None  # the one finished node
    assert len(episode_notes(store, KEY)) == 2


def test_a_holder_dead_after_its_commit_is_billed_by_its_note_alone(store, prices, monkeypatch):
    dead_after_its_note(store, prices, committed=True)
    claim = Claim(work_for(store, prices), store, NodeId("clip", "s1"), KEY, Resources())
    real, looks = store.get, []
    # the commit lands between the claim's first look and its taking the expired lease
    monkeypatch.setattr(store, "get", lambda key: looks.append(key) if not looks else real(key))
    assert claim.take() is None and len(looks) == 1 and current(store, KEY) is None
    [note] = episode_notes(store, KEY)  # its finished note, and no "holder died" beside it
    assert note.why is None and note.holder == "render-dead"


def test_a_node_told_to_stop_ends_at_its_claim_having_taken_nothing(store, prices, monkeypatch):
    """How a render ends the nodes that have not started (``ledger.stop``): before its lease, just
    after taking it (the word came meanwhile), or while it waits for another render's lease."""
    from pipeline.ledger import NodeStopped, stop, unstop

    work = work_for(store, prices)
    stop(store, KEY, work.holder)
    with pytest.raises(NodeStopped, match=r"clip\[s1\]: its render stopped it before it started"):
        with claimed(work, NodeId("clip", "s1"), KEY):
            pytest.fail("a stopped node computed")
    assert current(store, KEY) is None and store.notes(SPEND, KEY) == []
    with claimed(work_for(store, prices, holder="render-c"), NodeId("clip", "s1"), KEY) as claim:
        assert not claim.taken  # the word is to one render's node, not to the key
    unstop(store, KEY, work.holder)
    assert not ledger.stopped(store, KEY, work.holder)

    real = ledger.try_acquire  # the word lands while the node takes its lease

    def taking_while_told(*args, **kwargs):
        got = real(*args, **kwargs)
        stop(store, KEY, work.holder)
        return got

    monkeypatch.setattr(ledger, "try_acquire", taking_while_told)
    with pytest.raises(NodeStopped):
        with claimed(work, NodeId("clip", "s1"), KEY):
            pytest.fail("a stopped node computed")
    assert current(store, KEY) is None and store.notes(SPEND, KEY) == []  # its lease went back at once
    monkeypatch.setattr(ledger, "try_acquire", real)
    unstop(store, KEY, work.holder)

    other = try_acquire(store, KEY, holder="render-a", ttl_s=30).keep_alive()
    threading.Timer(0.3, stop, (store, KEY, work.holder)).start()
    t0 = time.monotonic()
    with pytest.raises(NodeStopped):  # waiting for render-a's lease, it hears the word within a poll
        with claimed(work, NodeId("clip", "s1"), KEY):
            pass
    assert time.monotonic() - t0 >= 0.3 and current(store, KEY).holder == "render-a"
    other.release()


def episode_notes(store, key):
    return [ledger.Spent.parse(store.read_note(SPEND, key, n), key) for n in store.notes(SPEND, key)]


# --------------------------------------------------------------------------- renders, on a real local Ray


@pytest.mark.slow
def test_every_node_writes_its_spend_and_a_rerun_shows_the_episodes_cost_beside_its_own_zero(
        local_ray, tmp_path, prices):
    store = open_store(tmp_path / "store")
    plan = plan_for(prices)
    first = render(plan, store=store, prices=prices, ffmpeg=FFMPEG)
    book = episode_ledger(plan, store)
    assert first.stopped is None and first.spent_before_yuan == 0.0
    assert book.total_yuan == pytest.approx(first.ledger.total_yuan) == pytest.approx(first.episode_spent_yuan)
    assert sorted(map(str, book.by_node())) == sorted(  # one note per executed node, all by this render
        [str(NodeId(st, s.shot.id)) for s in plan.shots for st in ("storyboard", "keyframes", "clip")] + ["assemble"]
        + [str(NodeId("voice", v.id)) for v in plan.voices])
    assert book.holders() == {first.render_id}
    assert Counter((r.stage, r.shot) for r in book.records()) == executed(first)
    again = render(plan, store=store, prices=prices, ffmpeg=FFMPEG)
    assert again.ledger.total_yuan == 0.0 and again.render_id != first.render_id
    assert again.spent_before_yuan == again.episode_spent_yuan == pytest.approx(first.ledger.total_yuan)


KILLED_DRIVER = """
import sys
from pipeline.cost import PriceCatalog
from pipeline.dag import Cluster
from pipeline.models import RenderPlan
from pipeline.render import render
from pipeline.store import open_store
import imageio_ffmpeg

address, store, plan_json, prices_csv = sys.argv[1:5]
plan = RenderPlan.model_validate_json(open(plan_json).read())
prices = PriceCatalog.load(prices_csv, usd_cny=7.10)
print("STARTED", flush=True)
render(plan, store=open_store(store), prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe(),
       cluster=Cluster(address), lease_s=1.5, on_node=lambda node, rows: print("DONE", node, flush=True))
print("FINISHED", flush=True)
"""


@pytest.mark.slow
def test_a_killed_renders_spend_is_part_of_the_episode_when_it_resumes(local_ray, tmp_path, prices):
    """A second driver on this cluster renders the episode and is SIGKILLed after a few nodes
    (Ray then kills its workers mid-node, their leases left to expire). The resumed render takes
    the finished nodes as hits, sits out the dead leases (1.5 s) instead of blocking, bills the
    dead holder's partial time as ``holder died`` notes, and its episode total is everything."""
    store = open_store(tmp_path / "store")
    plan = plan_for(prices)
    (tmp_path / "plan.json").write_text(plan.model_dump_json())
    (tmp_path / "driver.py").write_text(KILLED_DRIVER)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), local_ray, str(store.url),
                             str(tmp_path / "plan.json"), str(REPO / "cluster" / "prices.csv")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    done = []
    try:
        for line in proc.stdout:
            if line.startswith("DONE"):
                done.append(line.split()[1])
            if len(done) >= len(plan.shots) + 2 or line.startswith("FINISHED"):
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the driver we started, by its id
        proc.wait(timeout=30)
    assert len(done) >= len(plan.shots) + 2, f"the killed render finished too few nodes: {done}"
    killed = episode_ledger(plan, store)
    assert killed.total_yuan > 0 and len(killed.holders()) == 1
    assert store.get(plan.assemble_key) is None  # killed before it published anything
    finished = {killed.nodes[n.key] for n in killed.notes if n.why is None}
    assert {str(n) for n in finished} >= set(done)
    deadline = time.monotonic() + 30  # Ray kills the dead driver's workers; their leases stay, unrenewed
    while time.monotonic() < deadline and any(
            (got := current(store, key)) is not None and not got.expired() for key in killed.nodes):
        time.sleep(0.2)
    stale = {key for key in killed.nodes if current(store, key) is not None}

    resumed = render(plan, store=store, prices=prices, ffmpeg=FFMPEG)
    assert resumed.stopped is None
    assert resumed.spent_before_yuan == pytest.approx(killed.total_yuan)
    ran_now = {(r.stage, r.shot) for r in resumed.ledger.records if not r.cached}
    for node in finished:  # what the killed render finished is a hit now, never recomputed
        assert (LEDGER_STAGES[node.stage][0], node.shot) not in ran_now, node
    after = episode_ledger(plan, store)
    died = sum(n.yuan for n in after.notes if n.why == DIED)
    # every key the dead render held when it died was taken over, and its time until then billed
    assert {n.key for n in after.notes if n.why == DIED} == stale
    assert all(n.holder in killed.holders() and n.yuan > 0 for n in after.notes if n.why == DIED)
    assert resumed.episode_spent_yuan == pytest.approx(after.total_yuan)
    assert after.total_yuan == pytest.approx(killed.total_yuan + died + resumed.ledger.total_yuan)
    assert all(current(store, key) is None for key in after.nodes)  # no lease left behind


@pytest.mark.slow
def test_two_renders_of_one_script_at_once_compute_and_bill_every_node_once(local_ray, tmp_path, prices):
    store = open_store(tmp_path / "store")
    plan = plan_for(prices)
    results, errors, start = [], [], threading.Barrier(2)

    def one() -> None:
        start.wait()
        try:
            results.append(render(plan, store=open_store(tmp_path / "store"), prices=prices, ffmpeg=FFMPEG))
        except Exception as exc:  # reported below, with the other render's outcome
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and len(results) == 2
    a, b = results
    assert a.stopped is None and b.stopped is None
    assert a.outputs["episode.mp4"].read_bytes() == b.outputs["episode.mp4"].read_bytes()
    billed = executed(a) + executed(b)
    expected = Counter([("assemble", None), ("mix", None), ("subtitles", None)])
    expected.update(("voice", v.line.shot) for v in plan.voices)
    for s in plan.shots:
        audit = [("audit", s.shot.id)] * (2 if s.audit_frame is not None else 0)
        expected.update([("storyboard", s.shot.id), ("keyframes", s.shot.id), ("inbetween", s.shot.id),
                         ("encode", s.shot.id), *audit])
    assert billed == expected  # every node once, across both ledgers
    book = episode_ledger(plan, store)
    assert book.holders() <= {a.render_id, b.render_id} and all(n.why is None for n in book.notes)
    assert len(book.notes) == len(book.by_node())  # one note per node
    assert book.total_yuan == pytest.approx(a.ledger.total_yuan + b.ledger.total_yuan)
    assert a.episode_spent_yuan == pytest.approx(book.total_yuan) == pytest.approx(b.episode_spent_yuan)


@pytest.mark.slow
def test_a_rerun_through_the_cli_keeps_the_episodes_spend_in_cost_json(tmp_path):
    """The probe's complaint: a rerun overwrote cost.json with ¥0. Now cost.json says what this
    render paid (¥0: every node is in the store) and what the episode has cost so far."""
    import json

    places = {name: tmp_path / name for name in ("home", "cache", "data")}
    for folder in places.values():
        folder.mkdir()
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANIM_", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    env.update(HOME=str(places["home"]), XDG_CACHE_HOME=str(places["cache"]), XDG_DATA_HOME=str(places["data"]),
               ANIM_CONFIG=str(tmp_path / "config.toml"), ANIM_STORE=str(tmp_path / "store"),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", MLFLOW_DISABLE_TELEMETRY="true")
    costs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "pipeline", "render", str(SHOTLIST), "--out",
                               str(tmp_path / "out"), "--no-progress"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        costs.append(json.loads((tmp_path / "out" / "cost.json").read_text()))
    first, again = costs
    assert first["total_yuan"] > 0 and first["episode_spent_yuan"] == pytest.approx(first["total_yuan"])
    assert again["total_yuan"] == 0.0 and again["status"] == "complete"
    assert again["spent_before_yuan"] == again["episode_spent_yuan"] == pytest.approx(first["total_yuan"])
    assert "spent so far ¥" in " ".join(done.stdout.split())
