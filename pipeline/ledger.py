"""The episode's ledger: what every node of an episode has cost, whichever render paid for it.

Spend is never lost: each node writes its priced ledger rows into the artifact store as a
note keyed by its content key (``spend/<key>/<holder>-<generation>``) *before* it commits
its artifact, so

* a node that finished has its spend in the store even if its render is killed before it
  publishes anything, and a hit knows what it cost when it was made;
* a node that dies, is cancelled or fails between its note and its commit is billed by that
  note's rows, turned into a partial note (``unfinished``) by whoever finds its artifact
  missing: a finished note always means an artifact came of it, so a node computed again
  after such a loss is finished once, not twice;
* a node cancelled in flight by the budget cap is billed by its driver, from when its worker
  took the key's lease to when the cancel was confirmed (``why="cancelled"``);
* a node whose holder died (its lease expired) is billed by the render that takes the key
  over, from the dead lease's start to the heartbeat it missed (its last renewal plus a third
  of the lease's ``ttl_s``: it died before that; ``why="holder died"``). A holder that dies
  with no render ever needing the key again leaves its lease, and that time, unbilled;
* a node that fails bills the time it ran before the failure itself (``why="failed"``).

The episode's spend so far is the sum of every spend note of every node of its plan (each
note counted once, whoever wrote it); a render's own ledger is the rows it paid. Prices are
frozen in the notes: a note keeps the yuan of the catalog its node was priced with.

A node's ``Claim`` (used by every node body in ``pipeline.nodes``) holds its key's lease
while it computes (``pipeline.store.lease``) and writes its spend note; the driver reads the
notes back with ``episode_ledger``.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator

from pipeline.cost import PriceCatalog
from pipeline.models import LedgerRecord, RenderPlan
from pipeline.registry import CPU, Resources
from pipeline.schedule import LEDGER_STAGES, NodeId, Schedule
from pipeline.store import Lease, LeaseInfo, Store, open_store
from pipeline.store.lease import try_acquire
from stages.records import AnimError, ProfileError

SPEND = "spend"  # the notes' kind
STOP = "stop"  # a driver's word to a node of its render that has not started: do not start
SCHEMA = "anim.spend/1"
CANCELLED, DIED, FAILED = "cancelled", "holder died", "failed"
LEASE_S = 20.0  # a node's lease outlives its last heartbeat (every third of it) by this long
WAIT_S = 6 * 3600.0  # the longest a node waits for another render to finish the same key
WAIT_POLL_S = 0.2  # how often a waiting node looks for the artifact


@dataclass(frozen=True)
class Work:
    """What every node works with: the store's URL, the render it works for (the holder of its
    leases and spend notes), the prices its spend is frozen at, and its leases' lifetime."""

    store: str
    holder: str
    prices: PriceCatalog
    lease_s: float = LEASE_S
    wait_s: float = WAIT_S


@dataclass(frozen=True)
class Timing:
    """Seconds one ledger stage of a node held ``units`` of ``resource`` (``method``: which
    in-betweening method of an adaptive clip, billed one row each)."""

    stage: str
    seconds: float
    resource: str = CPU
    units: float = 1.0
    method: str | None = None


@dataclass(frozen=True)
class Spent:
    """One spend note: the rows one holder paid for one node (all of it, or the part before it
    was cancelled or died)."""

    node: str
    key: str
    holder: str
    rows: list[LedgerRecord]
    started: float = 0.0
    ended: float = 0.0
    why: str | None = None  # None: the node finished; CANCELLED or DIED: partial time

    @property
    def yuan(self) -> float:
        return sum(r.yuan for r in self.rows)

    def dump(self) -> bytes:
        return json.dumps({"schema": SCHEMA, "node": self.node, "key": self.key, "holder": self.holder,
                           "started": self.started, "ended": self.ended, "why": self.why,
                           "rows": [r.model_dump() for r in self.rows]}, ensure_ascii=False).encode()

    @classmethod
    def parse(cls, raw: bytes, key: str) -> "Spent":
        data = json.loads(raw)
        return cls(node=str(data["node"]), key=key, holder=str(data["holder"]),
                   rows=[LedgerRecord(**r) for r in data["rows"]], started=float(data.get("started") or 0.0),
                   ended=float(data.get("ended") or 0.0), why=data.get("why"))


def note_name(holder: str, generation: int, why: str | None = None) -> str:
    """A spend note's name: one per holder and lease generation, and one more per partial reason."""
    suffix = {None: "", CANCELLED: "-cancelled", DIED: "-lost", FAILED: "-failed"}[why]
    return f"{holder}-{generation:08d}{suffix}"


def record(store: Store, spent: Spent, generation: int) -> bool:
    """Write a spend note (once: a second writer of the same note is refused). A finished node's
    note replaces the ``holder died`` note another render may have written about it while it
    stalled past its lease."""
    created = store.create_note(SPEND, spent.key, note_name(spent.holder, generation, spent.why), spent.dump())
    if spent.why is None:
        store.remove_note(SPEND, spent.key, note_name(spent.holder, generation, DIED))
    return created


def unfinished(store: Store, spent: Spent, generation: int, why: str) -> Spent:
    """A finished note whose artifact never landed (its node died, was cancelled or failed
    between its spend note and its commit) becomes a partial note of the same rows: the money
    was spent, but nothing came of it, and the node computed again is the one that finished.
    A finished note thus always means the artifact was committed (or is being committed by a
    live holder)."""
    partial = replace(spent, why=why)
    create_once_more(store, spent.key, note_name(spent.holder, generation, why), partial.dump())
    store.remove_note(SPEND, spent.key, note_name(spent.holder, generation))
    return partial


def create_once_more(store: Store, key: str, name: str, data: bytes) -> None:
    """Write a partial note as one more: a retried node takes the key's lease again at the same
    generation (the failed attempt released it), so each attempt's note gets a number of its
    own, never refused as a second writer."""
    for attempt in range(1, 1000):
        if store.create_note(SPEND, key, name + (f"-{attempt}" if attempt > 1 else ""), data):
            return


def finished_at(store: Store, key: str, holder: str, generation: int) -> Spent | None:
    """The finished note ``holder`` wrote under its lease of ``generation``, if any."""
    raw = store.read_note(SPEND, key, note_name(holder, generation))
    try:
        return None if raw is None else Spent.parse(raw, key)
    except (ValueError, KeyError, TypeError):
        return None


def finished_by(store: Store, key: str, holder: str) -> Spent | None:
    """The note ``holder`` wrote when its node of ``key`` finished, if it got that far."""
    for name in store.notes(SPEND, key):
        if name.startswith(f"{holder}-") and name[len(holder) + 1:].isdigit():
            raw = store.read_note(SPEND, key, name)
            if raw is not None:
                return Spent.parse(raw, key)
    return None


class NodeStopped(AnimError):
    """The node's render told it to stop before it started (``stop``): nothing was computed."""


def stop(store: Store, key: str, holder: str) -> None:
    """Tell ``holder``'s node of ``key`` not to start: it ends at its claim, before or just
    after taking the key's lease (how a render ends nodes that have not started, see
    ``pipeline.dag``)."""
    store.write_note(STOP, key, holder, b"")


def stopped(store: Store, key: str, holder: str) -> bool:
    return store.read_note(STOP, key, holder) is not None


def unstop(store: Store, key: str, holder: str) -> None:
    store.remove_note(STOP, key, holder)


def partial_rows(prices: PriceCatalog, node: NodeId, seconds: float, resource: str, units: float) -> list[LedgerRecord]:
    """The ledger row of a node's partial time, on its first ledger stage (``clip`` → inbetween), marked partial."""
    row = prices.record(LEDGER_STAGES[node.stage][0], node.shot, max(seconds, 0.0), resource, units)
    return [row.model_copy(update={"partial": True})]


def plan_nodes(plan: RenderPlan) -> list[tuple[NodeId, str]]:
    """Every node of the plan with its content key: what the episode's ledger covers."""
    out = [(NodeId(stage, s.shot.id), s.keys[stage])
           for s in plan.shots for stage in ("storyboard", "keyframes", "clip")]
    out += [(NodeId("plates", k), k) for k in plan.plates] + [(NodeId("sheets", k), k) for k in plan.sheets.values()]
    out += [(NodeId("voice", v.id), v.key) for v in plan.voices]
    return out + [(NodeId("assemble"), plan.assemble_key), (NodeId("contact_sheet"), plan.contact_sheet_key)]


@dataclass
class EpisodeLedger:
    """Every spend note of an episode's nodes, as the store holds them now."""

    notes: list[Spent] = field(default_factory=list)
    nodes: dict[str, NodeId] = field(default_factory=dict)  # content key -> node

    @property
    def total_yuan(self) -> float:
        return sum((n.yuan for n in self.notes), 0.0)

    @property
    def partial_yuan(self) -> float:
        """What cancelled nodes and nodes of dead holders cost (no artifact came of it)."""
        return sum((n.yuan for n in self.notes if n.why is not None), 0.0)

    def holders(self) -> set[str]:
        return {n.holder for n in self.notes}

    def by_node(self) -> dict[NodeId, float]:
        out: dict[NodeId, float] = {}
        for n in self.notes:
            node = self.nodes[n.key]
            out[node] = out.get(node, 0.0) + n.yuan
        return out

    def records(self) -> list[LedgerRecord]:
        return [r for n in self.notes for r in n.rows]

    def history(self, sched: Schedule, prices: PriceCatalog) -> dict[str, tuple[float, float]]:
        """Per node stage, (Σ actual, Σ estimated) yuan of the finished nodes the schedule
        estimates: how far this cluster's earlier renders of the episode ran from the rows. Rows
        are re-priced with ``prices``, so a change of tier or provider is not mistaken for a
        slower machine."""
        out: dict[str, tuple[float, float]] = {}
        for n in self.notes:
            node = sched.get(self.nodes[n.key])
            if n.why is not None or node is None or node.estimate_yuan <= 0:
                continue
            try:
                yuan = sum(prices.cost(r.seconds, r.resource, r.units) for r in n.rows)
            except ProfileError:  # a resource this catalog does not price: no evidence either way
                continue
            actual, planned = out.get(node.id.stage, (0.0, 0.0))
            out[node.id.stage] = (actual + yuan, planned + node.estimate_yuan)
        return out


def episode_ledger(plan: RenderPlan, store: Store) -> EpisodeLedger:
    """Every spend note of every node of ``plan`` in ``store``. A note that cannot be parsed is
    not spend anyone can prove, and is skipped; a store that cannot be read raises StoreError."""
    out = EpisodeLedger()
    for node, key in plan_nodes(plan):
        if key in out.nodes:
            continue
        out.nodes[key] = node
        for name in store.notes(SPEND, key):
            raw = store.read_note(SPEND, key, name)
            if raw is None:
                continue
            try:
                out.notes.append(Spent.parse(raw, key))
            except (ValueError, KeyError, TypeError):
                continue
    return out


# --------------------------------------------------------------------------- a node's claim


class Claim:
    """A node's hold on its content key: the key's lease while it computes, then its spend note."""

    def __init__(self, work: Work, store: Store, node: NodeId, key: str, held: Resources, share: float = 1.0):
        self.work, self.store, self.node, self.key, self.held, self.share = work, store, node, key, held, share
        self.lease: Lease | None = None
        self.timings: list[Timing] = []
        self.rows: list[LedgerRecord] = []
        self.t0, self.started = time.perf_counter(), time.time()

    def take(self) -> Lease | LeaseInfo | None:
        """One look: None if the artifact is in the store, the live lease of another holder, or
        this node's own new lease (held and renewed from now on)."""
        if self.store.get(self.key) is not None:
            return None
        self._unless_stopped()
        got = try_acquire(self.store, self.key, holder=self.work.holder, ttl_s=self.work.lease_s,
                          info={"node": str(self.node), "resource": self.held.resource, "units": self.held.units,
                                "share": self.share})
        if isinstance(got, LeaseInfo):
            return got
        landed = self.store.get(self.key) is not None  # finished by the holder we saw leave
        if got.took_over is not None:
            self._bill_dead(got.took_over, landed)
        if landed:
            got.release()
            return None
        self.lease = got.keep_alive()
        self._unless_stopped()  # told to stop while it took the lease: the driver did not see it
        self.t0, self.started = time.perf_counter(), time.time()
        return got

    def _unless_stopped(self) -> None:
        if stopped(self.store, self.key, self.work.holder):
            self.release()
            self.lease = None
            raise NodeStopped(f"{self.node}: its render stopped it before it started")

    def _bill_dead(self, dead: LeaseInfo, landed: bool) -> None:
        """A holder that died with the key: its time from lease to last heartbeat was spent. One
        that died after its spend note is billed by that note: as it is if its artifact landed
        (it died before it released its lease), as a partial one if it did not."""
        done = finished_at(self.store, self.key, dead.holder, dead.generation)
        if done is not None:
            if not landed:
                unfinished(self.store, done, dead.generation, DIED)
            return
        info = dead.info
        # It was alive at its last renewal and missed the next beat a third of ``ttl_s`` later.
        ended = min(dead.renewed + dead.ttl_s / 3, time.time())
        seconds = (ended - dead.started) * float(info.get("share", 1.0))
        rows = partial_rows(self.work.prices, self.node, seconds, str(info.get("resource", self.held.resource)),
                            float(info.get("units", self.held.units)))
        record(self.store, Spent(str(self.node), self.key, dead.holder, rows, dead.started, ended, DIED),
               dead.generation)

    @property
    def taken(self) -> bool:
        """The artifact was made by another render (this node holds no lease)."""
        return self.lease is None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def spend(self, timings: list[Timing]) -> None:
        """Price the node's timings and record them in the store; call it just before the commit."""
        assert self.lease is not None, "spend() of a node that holds no lease"
        self.timings = timings
        self.rows = [self.work.prices.record(t.stage, self.node.shot, t.seconds, t.resource, t.units, method=t.method)
                     for t in timings]
        record(self.store, Spent(str(self.node), self.key, self.work.holder, self.rows, self.started, time.time()),
               self.lease.generation)

    def failed(self) -> None:
        """The node failed: record the time it ran; one that failed after its spend note (its
        commit did) keeps that note's rows as a failed one."""
        if self.lease is None:
            return
        if self.rows:
            try:
                done = finished_at(self.store, self.key, self.work.holder, self.lease.generation)
                if done is not None and self.store.get(self.key) is None:
                    unfinished(self.store, done, self.lease.generation, FAILED)
            except Exception:  # the node's own failure is the one to report
                pass
            return
        rows = partial_rows(self.work.prices, self.node, self.elapsed() * self.share, self.held.resource,
                            self.held.units)
        spent = Spent(str(self.node), self.key, self.work.holder, rows, self.started, time.time(), FAILED)
        try:
            create_once_more(self.store, self.key, note_name(self.work.holder, self.lease.generation, FAILED),
                             spent.dump())
        except Exception:  # the node's own failure is the one to report
            pass

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()


@contextmanager
def claimed(work: Work, node: NodeId, key: str, held: Resources = Resources()) -> Iterator[Claim]:
    """The node's claim on ``key``, waiting while another render holds it; released on the way out."""
    claim = Claim(work, open_store(work.store), node, key, held)
    deadline = time.monotonic() + work.wait_s
    while True:
        got = claim.take()
        if not isinstance(got, LeaseInfo):
            break
        if time.monotonic() > deadline:
            raise AnimError(f"waited {work.wait_s:.0f} s for render {got.holder} to finish this node (its lease "
                            "is still renewed); nothing was computed")
        time.sleep(WAIT_POLL_S)
    try:
        yield claim
    except Exception:
        claim.failed()
        raise
    finally:
        claim.release()
