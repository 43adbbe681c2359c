"""Schedule → Ray task graph → measured, priced ledger rows. The only module that imports Ray.

The executor submits the nodes a ``pipeline.schedule.Schedule`` says must run, per shot as a
chain of remote tasks linked by ObjectRefs, so Ray's own dependency resolution schedules it::

    storyboard ─► keyframes (+ audit drawing) ─► clip (in-betweens streamed into the encoder)
    every shot's clip and panel ───────────────► assemble (or the contact sheet alone)

Hits are not submitted; they are cached ledger rows at ¥0. A model-holding keyframe backend
runs as a pool of actors (loaded once, batches across shots; plates and sheets first).
Every executed node returns its measured seconds, the resources it held and those priced
(its spend note is in the store already, ``pipeline.ledger``); a node another render made
meanwhile comes back ``taken`` and is a hit.

With a budget (``pipeline.budget.BudgetGuard``) the budget is a cap:

1. the storyboards are admitted together with the contact sheet's reservation — with no lesson
   from this cluster's earlier renders, one panel first, then the others and the voices if they
   fit at the margin it teaches — no chain starts before they are done (their actual/estimate
   ratio is the first thing learned), and the
   contact sheet is made as soon as they are — paid from the budget before the chains can use
   it up, so a render that stops for budget delivers it (when the episode is assembled, the
   sheet made early is one panel's worth of extra spend);
2. chains are admitted one at a time until their stages' ratios are known (from this
   cluster's earlier renders of the episode, or from the first chain), then as many as fit at
   the learned margins — chains the schedule held for budget stand by;
3. every ``POLL_S`` the executor reads, from each running node's lease, when it started, and
   charges what it has cost so far; nodes not started yet are cancelled (latest first) while
   what is committed passes the budget, and when spend so far — plus what running nodes, and
   ready ones that may start, will cost in the time it takes to stop them — reaches the budget
   every node in flight is cancelled (tasks force-killed, model actors killed). A cancelled
   node is billed from its lease's start to the confirmed cancel, in this render's ledger and
   as a spend note; finished nodes stay in the store.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline import ledger
from pipeline.budget import BudgetGuard
from pipeline.cost import PriceCatalog
from pipeline.ledger import Work
from pipeline.models import LedgerRecord, RenderPlan, ShotPlan
from pipeline.nodes import (KeyframeWorker, Measured, assemble_node, clip_node, contact_sheet_node, keyframes_node,
                            storyboard_node, voice_node, VoiceWorker)
from pipeline.registry import Resources
from pipeline.schedule import Node, NodeId, Schedule, contact_sheet_estimate, prerequisites
from pipeline.store import Store
from pipeline.store.lease import LeaseInfo, clear as clear_lease, current as current_lease
from stages.records import AnimError, NodeError, TransientNodeError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # starting or joining a cluster fails with one line after this long
RETRIES = 2  # a node failing transiently (its encoder killed, its worker dead) runs at most 1 + RETRIES times
STOP_WAIT_S = 15.0  # how long nodes told to stop have to come back before Ray cancels them (queued, not dispatching)
POLL_S = 0.05  # with a budget: how often running nodes' cost so far is looked at
STOP_AHEAD_S = 0.1  # the cap stops running nodes at least this long before they would reach it: two
# polls and the ~20 ms a force-cancel takes to confirm (measured on a local 2-core cluster) — or twice
# the longest recent gap between two looks (a busy driver looks less often than it means to), or a
# poll more than the longest cancel has taken to confirm in this render


@dataclass
class Execution:
    """What the executor did: priced ledger rows, and what is now in the store."""

    records: list[LedgerRecord] = field(default_factory=list)
    spans: list[tuple[str, float, float]] = field(default_factory=list)  # (node, start, end) epochs
    quality: dict[str, dict[str, float]] = field(default_factory=dict)  # shot -> audit metrics of clips run now
    consistency: dict[str, float] = field(default_factory=dict)  # character -> colour consistency 0…1
    done: set[NodeId] = field(default_factory=set)  # hits and nodes run to completion
    finish: NodeId | None = None  # the episode-level node that ran or was a hit
    cluster: dict[str, float] = field(default_factory=dict)  # resources the render held: {"CPU": 2, "GPU": 0}
    ray_init_seconds: float = 0.0
    wall_seconds: float = 0.0  # set by ``render.speak``: the voices' phase, part of the render's wall
    stage_seconds: float = 0.0  # resource-seconds inside nodes, as the ledger bills them
    cancelled: list[NodeId] = field(default_factory=list)  # nodes the budget cap stopped in flight
    cancelled_yuan: float = 0.0  # their partial time, billed (in ``records`` too)
    cap_reached: bool = False  # the cap stopped running nodes
    budget_note: str | None = None  # why the budget left the storyboard or the episode undone
    startups: list[LedgerRecord] = field(default_factory=list)  # model actors' load/warm-up: billed, not attributed


class Cluster:
    """Ray, started on first use: a render whose every node is a hit never starts it.

    With no address, a new local cluster of its own (``address="local"``), never one that
    happens to be running on the machine; with ``RAY_ADDRESS``, that cluster, with this
    package's code shipped as ``py_modules``.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None,
                 start_timeout_s: float = START_TIMEOUT_S, init_options: dict[str, Any] | None = None,
                 store: str | None = None):
        self.address, self.num_cpus, self.init_seconds, self.started = address, num_cpus, 0.0, False
        self.store = store  # the artifact store's URL: a cluster joined must see it from every node
        self.start_timeout_s = start_timeout_s
        self.init_options = dict(init_options or {})  # more ``ray.init`` arguments for a local cluster
        self._keeper: threading.Event | None = None

    def start(self) -> None:
        """Start (or join) the cluster within ``start_timeout_s``; else fail with one line, having
        shut Ray down and ended every process this start began (and no other)."""
        if self.started:
            return
        import ray

        t0 = time.perf_counter()
        if not ray.is_initialized():
            if self.address:
                _check_reachable(self.address)
                self._bounded(ray, self._connect_options(),
                              f"the Ray cluster at RAY_ADDRESS={self.address} could not be joined",
                              "(unset RAY_ADDRESS to render on a local cluster)")
                alive = sum(1 for n in ray.nodes() if n.get("Alive"))
                if self.store is not None and (problem := store_reach_problem(self.store, alive)):
                    ray.shutdown()
                    raise AnimError(problem)
            else:
                options = {"address": "local", "num_cpus": self.num_cpus, "include_dashboard": False,
                           "logging_level": "WARNING", "log_to_driver": False, **self.init_options}
                self._bounded(ray, options, "the local Ray cluster did not start", "")
        self.init_seconds, self.started = time.perf_counter() - t0, True

    def _connect_options(self) -> dict[str, Any]:
        import pipeline
        import stages

        return {"address": self.address, "logging_level": "WARNING", "log_to_driver": False,
                "runtime_env": {"py_modules": [str(Path(pipeline.__file__).parent), str(Path(stages.__file__).parent)]}}

    def _bounded(self, ray: Any, options: dict[str, Any], what: str, hint: str) -> None:
        """``ray.init(**options)`` in a thread that can be abandoned after ``start_timeout_s``.

        The thread stays alive after a start: Ray's processes die with the thread that started
        them (PR_SET_PDEATHSIG), so it waits for ``shutdown()``. On a timeout or a failure Ray is
        shut down, the processes this start left (new descendants of this process) are killed and
        the thread is let go, which ends any it starts afterwards."""
        import psutil

        before = {p.pid for p in psutil.Process().children(recursive=True)}
        done, keep, failure = threading.Event(), threading.Event(), []

        def init() -> None:
            try:
                ray.init(**options)
            except BaseException as exc:  # reported by the caller's thread
                failure.append(exc)
            done.set()
            keep.wait()

        # ray.init installs its SIGTERM handler (exit, so that shutdown runs) only from the main
        # thread and warns otherwise: install the same one here, and keep its warning off stderr.
        if threading.current_thread() is threading.main_thread():
            ray._private.utils.set_sigterm_handler(lambda signum, frame: sys.exit(signum))
        quiet = _Without("SIGTERM handler is not set")
        logging.getLogger("ray._private.worker").addFilter(quiet)
        threading.Thread(target=init, name="ray-start", daemon=True).start()
        try:
            ok = done.wait(self.start_timeout_s) and not failure
        finally:
            logging.getLogger("ray._private.worker").removeFilter(quiet)
        if ok:
            self._keeper = keep
            return
        problem = (f" within {self.start_timeout_s:g} s" if not failure else
                   ": " + (_first_line(failure[0]) or type(failure[0]).__name__))
        try:
            ray.shutdown()
        except Exception:  # the start's own failure is the one to report
            pass
        keep.set()
        _end_new_processes(before)
        tail = f" {hint}" if hint else ""
        raise AnimError(f"{what}{problem}; nothing was rendered{tail}") from None

    def shutdown(self) -> None:
        """Shut Ray down (if this cluster started it) and let its start thread go."""
        import ray

        if self.started:
            ray.shutdown()
        if self._keeper is not None:
            self._keeper.set()
            self._keeper = None
        self.started = False

    def check(self, held: Resources, what: str) -> None:
        """Refuse, before any work, a node that asks for more GPUs than the cluster has."""
        if not held.gpus:
            return
        import ray

        self.start()
        have = float(ray.cluster_resources().get("GPU", 0.0))
        if held.gpus > have:
            raise AnimError(f"no GPU in the cluster for {what}: it asks for {held.gpus:g} GPU per worker and the "
                            f"Ray cluster has {have:g}; set its device = 'cpu', or point RAY_ADDRESS at a cluster "
                            "with GPUs; nothing was rendered")

    def task(self, fn: Callable[..., Any], held: Resources = Resources()) -> Any:
        import ray

        self.start()
        # Ray retries a node whose worker died (a system failure) and one that raised a
        # TransientNodeError, RETRIES times; any other failure fails the node at once.
        return ray.remote(num_cpus=held.cpus, num_gpus=held.gpus or None, max_retries=RETRIES,
                          retry_exceptions=[TransientNodeError])(fn)

    def resources(self) -> dict[str, float]:
        """What the render held: the cluster's CPUs and GPUs, or nothing if Ray never started."""
        if not self.started:
            return {}
        import ray

        return {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}


class _Without(logging.Filter):
    """Drops log records that start with ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.text)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else ""


def _end_new_processes(before: set[int], settle_s: float = 2.0) -> None:
    """Kill the descendants of this process that were not there in ``before`` (the ones a failed
    start began: GCS, raylet, agents, workers), looking again until none is left."""
    import psutil

    deadline = time.monotonic() + settle_s
    while True:
        new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        for p in new:  # all of them listed first: a killed raylet's children are reparented
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(new, timeout=1.0)
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)  # an abandoned start may still be starting one


def store_reach_problem(store: str, alive_nodes: int) -> str | None:
    """Why a render on a cluster of ``alive_nodes`` cannot use ``store``, or None: with more than
    one node, a local folder is refused, since the other nodes would write their artifacts where
    the driver cannot read them (and lose them with the node)."""
    store = str(store)
    if alive_nodes > 1 and ("://" not in store or store.startswith("file://")):
        return (f"store {store}: a local folder, but the Ray cluster has {alive_nodes} nodes and the others "
                "cannot see it; set ANIM_STORE to an object store URL every node reaches (s3://…, oss://…); "
                "nothing rendered")
    return None


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when a ``host:port`` cluster address does not answer."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # "auto", "ray://…" and other forms: Ray resolves them itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise AnimError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {exc}; nothing was rendered "
                        "(unset RAY_ADDRESS to render on a local cluster)") from None


def get(ref: Any, node: NodeId, attempts: int = 1) -> Any:
    """``ray.get`` that raises the node's own error: a NodeError naming the node (the worker's
    traceback in ``remote_traceback``), whatever failed — the stage, the worker or the actor.
    ``attempts``: how many times Ray runs it (a task: 1 + RETRIES; an actor call: 1), which a
    transient failure's final line reports."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, TransientNodeError):  # every retry it had is spent
            tries = f"{attempts} attempts" if attempts > 1 else "1 attempt"
            raise NodeError(exc.cause.node, f"{exc.cause.problem} (failed {tries})",
                            exc.cause.remote_traceback) from None
        if isinstance(exc.cause, AnimError):
            raise exc.cause from None
        raise NodeError(str(node), f"{type(exc.cause).__name__}: {exc.cause}", str(exc)) from None
    except ray.exceptions.RayError as exc:  # a worker or actor that died: no cause to carry
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise NodeError(str(node), f"{type(exc).__name__}: {first}", str(exc)) from None


class _ActorPool:
    """Model actors for a model-holding keyframe backend: ``actors`` replicas (the backend's
    ``actors`` setting, 1 if it has none), each holding the backend's resources."""

    def __init__(self, cluster: Cluster, plan: RenderPlan, work: Work):
        p = plan.profile
        self.entry, self.settings = p.entry("keyframes"), p.settings_for("keyframes")
        self.held = self.entry.resources(self.settings)
        self.plan, self.work, self.cluster = plan, work, cluster
        self.n = getattr(self.settings, "actors", 1)
        self.batch_size = getattr(self.settings, "batch_size", 4)
        self.actors: list[Any] = []
        self.turn = 0
        self.batches = 0  # batch calls made: each batch's number
        self.startups: list[LedgerRecord] = []  # every actor start's model_load (+ warmup) rows: billed, no shot

    def start(self) -> None:
        """Create the actors and wait until each has loaded its model: a missing model, no GPU or a
        model that does not fit is reported here, before any node is submitted. Each start is billed
        on the actor's resources: ``model_load`` from the actor's submission to its model built
        (worker process, imports, weights), ``warmup`` for a backend's warm-up step."""
        import ray

        self.cluster.start()  # this cluster, with its options, and its start billed as such: never Ray's
        # own auto-init on the first actor (a CPU backend's check starts nothing), whose start would
        # land in the model load
        self.cluster.check(self.held, f"the {self.entry.name} keyframe backend")
        actor = ray.remote(num_cpus=1, num_gpus=self.held.gpus or None)(KeyframeWorker)
        p = self.plan
        submitted = time.time()
        self.actors = [actor.remote(entry=self.entry, settings=self.settings, width=p.width, height=p.height,
                                    work=self.work) for _ in range(self.n)]
        try:
            for a in self.actors:
                up = get(a.startup.remote(), NodeId("keyframes", f"{self.entry.name} backend"))
                load_s = max(up["created"] - submitted, 0.0) + up["load_s"]
                self.startups.append(self.work.prices.record("model_load", None, load_s, self.held.resource,
                                                             self.held.units))
                if up["warmup_s"]:
                    self.startups.append(self.work.prices.record("warmup", None, up["warmup_s"], self.held.resource,
                                                                 self.held.units))
        except NodeError as exc:
            raise AnimError(f"the {self.entry.name} backend could not start: {exc.problem}; nothing was "
                            "rendered") from exc

    def _next(self) -> Any:
        if not self.actors:
            self.start()
        self.turn += 1
        return self.actors[self.turn % len(self.actors)]

    def prerequisite(self, node: Node) -> tuple[Any, Any]:
        """A background plate or a character sheet, drawn once into the store: (ref, actor)."""
        actor = self._next()
        if node.id.stage == "plates":
            return actor.plate.remote(node.key, self.plan.plates[node.key]), actor
        name = next(n for n, k in self.plan.sheets.items() if k == node.key)
        return actor.sheet.remote(node.key, name), actor

    def keyframes(self, shots: list[ShotPlan], deps: list[Any]) -> list[tuple[ShotPlan, Any, float, Any, int]]:
        """Batches of shots, about ``2 × batch_size`` keyframes each, round-robin over the actors:
        (shot, ref, its share of the batch, the actor, which batch)."""
        out, group, count = [], [], 0
        for i, shot in enumerate(shots):
            group.append(shot)
            count += len(shot.keyframes) + (shot.audit_frame is not None)
            if count >= 2 * self.batch_size or i == len(shots) - 1:
                plates = {s.keys["plate"]: self.plan.plates[s.keys["plate"]] for s in group if "plate" in s.keys}
                sheets = {n: self.plan.sheets[n] for s in group for n in s.shot.characters if n in self.plan.sheets}
                actor = self._next()
                refs = actor.keyframes.options(num_returns=len(group)).remote(group, plates, sheets, *deps)
                self.batches += 1
                batch = self.batches
                out += [(s, r, 1 / len(group), actor, batch) for s, r in zip(group, refs if len(group) > 1 else [refs])]
                group, count = [], 0
        return out

    def consistency(self, shots: list[ShotPlan]) -> Any:
        return self._next().consistency.remote(shots)

    def kill(self, actor: Any) -> None:
        """Stop an actor now (the cap): its running and queued calls fail; the pool starts afresh."""
        import ray

        ray.kill(actor)
        self.actors = [a for a in self.actors if a != actor]


@dataclass
class _Flight:
    """A submitted node: what it holds (for its cost so far) and when its worker took its lease."""

    node: NodeId
    key: str
    resource: str
    units: float
    rate: float  # ¥ per second of what it holds
    share: float = 1.0  # its part of a batch call
    after: tuple[NodeId, ...] = ()  # submitted nodes it waits for
    actor: Any = None  # the model actor it runs on, None for a task
    group: int | None = None  # the batch call it is part of (cancelled together)
    lease: LeaseInfo | None = None  # its own lease, once its worker took it
    finished: float | None = None  # ¥ of its spend note, once it finished inside a call still running

    def cost_so_far(self, now: float) -> float:
        return max(now - self.lease.started, 0.0) * self.rate * self.share if self.lease else 0.0


class _Run:
    """One execution of a schedule: what is in flight, what the budget allows, the ledger."""

    def __init__(self, plan: RenderPlan, sched: Schedule, *, store: Store, prices: PriceCatalog, ffmpeg: str,
                 cluster: Cluster, guard: BudgetGuard, work: Work,
                 on_progress: Callable[[int, int, float], None] | None,
                 on_node: Callable[[NodeId, list[LedgerRecord]], None] | None = None):
        self.plan, self.sched, self.store, self.prices, self.ffmpeg = plan, sched, store, prices, ffmpeg
        self.cluster, self.guard, self.work, self.on_progress, self.on_node = cluster, guard, work, on_progress, on_node
        self.ray_was_up = cluster.started
        self.spent_before = guard.spent  # the episode's earlier spend, when the budget is the episode's
        self.out = Execution()
        self.in_flight: dict[Any, _Flight] = {}
        self.refs: dict[NodeId, Any] = {}  # submitted node -> its ref (inputs of later nodes)
        self.learning: set[str] = set()  # shots admitted while their stages' ratios were unknown
        self.stopping = False  # the cap was reached or the storyboard did not fit: nothing more starts
        self.looked: list[float] = []  # when watch() last ran, and the recent gaps between its runs
        self.cancel_s = 0.0  # the longest a cancel took to confirm
        self.billed_attempts: set[tuple[str, str]] = set()  # (key, spend note) of failed attempts billed
        self.slots = 0.0  # how many nodes can run at once (the cluster's CPUs and GPUs)
        p = plan.profile
        self.entries = {stage: (p.entry(stage), p.settings_for(stage)) for stage in ("storyboard", "keyframes",
                                                                                      "inbetween")}
        kf_entry, kf_settings = self.entries["keyframes"]
        self.pool = _ActorPool(cluster, plan, work) if kf_entry.actor else None
        self.voice_startups: list[LedgerRecord] = []  # a voice actor's start: billed, not attributed
        self.voice_actors: list[Any] = []
        self.boards_waiting: list[Node] = []  # panels held until the first one measured this machine
        self.voiced = False  # the voices were submitted (or found not to fit)

    # ---- 1. before any work: model backends load, GPUs exist
    def prepare(self) -> None:
        if self.sched.where("run", "keyframes") and self.pool is not None:
            self.pool.start()
        if self.sched.where("run", "clip") or self.sched.where("held", "clip"):
            entry, settings = self.entries["inbetween"]
            if entry.resources(settings).gpus and self.sched.where("run", "clip"):
                self.cluster.check(entry.resources(settings), f"the {entry.name} in-betweener")

    # ---- 2. the ledger
    def hit(self, node: Node) -> None:
        for stage in node.ledger_stages:
            if stage != "audit" or self._audited(node):
                self.out.records.append(self.prices.record(stage, node.id.shot, 0.0, "cpu", 1.0, cached=True))
        self.out.done.add(node.id)

    def _audited(self, node: Node) -> bool:
        shot = next((s for s in self.plan.shots if s.shot.id == node.id.item), None)
        return shot is not None and shot.audit_frame is not None

    def take(self, measured: Measured, flight: _Flight) -> None:
        """A finished node into the ledger: its priced rows charged, its reservation released (a
        node another render made meanwhile is a hit)."""
        node = flight.node
        self._landed(flight)
        earlier = self.earlier_attempts(flight)
        if measured.taken:
            self.guard.release(node)
            self.hit(self.sched.get(node) or Node(node, flight.key, "hit"))
            if earlier:  # it failed here before another render made it: that time was spent
                self.out.records += earlier
                self.guard.charge(sum(r.yuan for r in earlier))
                if self.on_node:
                    self.on_node(node, earlier)
            return
        rows = earlier + measured.rows
        self.out.records += rows
        self.out.stage_seconds += sum(t.seconds * t.units for t in measured.timings)
        yuan = sum(r.yuan for r in rows)
        self.guard.charge(yuan)
        if node.stage in ("plates", "sheets"):
            self.guard.release(node)  # priced per episode: no lesson for one node
        else:
            self.guard.finish(node, yuan - sum(r.yuan for r in earlier))  # the margin learns how far off estimates
            # run, from the attempt that finished
        self.out.spans.append(("+".join(t.stage for t in measured.timings), *measured.span))
        if measured.quality and measured.node.shot:
            self.out.quality[measured.node.shot] = measured.quality
        self.out.done.add(node)
        if self.on_node:
            self.on_node(node, rows)

    def earlier_attempts(self, flight: _Flight) -> list[LedgerRecord]:
        """The rows of this render's attempts at the node that failed or died before the one that
        came back (Ray retried them): each one's spend note, once."""
        rows: list[LedgerRecord] = []
        for name in self.store.notes(ledger.SPEND, flight.key):
            if not name.startswith(f"{self.work.holder}-") or not ("-failed" in name or name.endswith("-lost")):
                continue
            if (flight.key, name) in self.billed_attempts:
                continue
            raw = self.store.read_note(ledger.SPEND, flight.key, name)
            if raw is None:
                continue
            self.billed_attempts.add((flight.key, name))
            rows += ledger.Spent.parse(raw, flight.key).rows
        return rows

    def _landed(self, flight: _Flight) -> None:
        if flight.node.stage == "clip":
            self.learning.discard(flight.node.item)

    # ---- 3. submission
    def rate(self, held: Resources, *, with_cpu: bool = False) -> float:
        """¥ per second of holding ``held`` (or the CPU core a node also bills, if dearer)."""
        rate = self.prices.cost(1.0, held.resource, held.units)
        return max(rate, self.prices.cost(1.0, "cpu", 1.0)) if with_cpu else rate

    def submit(self, node: Node, ref: Any, held: Resources = Resources(), *, share: float = 1.0,
               after: tuple[NodeId, ...] = (), actor: Any = None, group: int | None = None, learn: bool = True,
               reserve: bool = True, with_cpu: bool = False) -> None:
        self.in_flight[ref] = _Flight(node.id, node.key, held.resource, held.units, self.rate(held, with_cpu=with_cpu),
                                      share, tuple(a for a in after if a in self.refs), actor, group)
        self.refs[node.id] = ref
        if reserve:
            self.guard.reserve(node.id, node.estimate_yuan, stage=node.id.stage, learn=learn)

    def storyboards(self) -> None:
        """Every scheduled panel together with the contact sheet's reservation, or none."""
        boards = self.sched.where("run", "storyboard")
        # Reserved even when the schedule ends with the episode: the cap may stop the chains.
        sheet_yuan = contact_sheet_estimate(self.plan) if (
            self.guard.capped and self.store.get(self.plan.contact_sheet_key) is None
            and any(n.id.stage == "storyboard" for n in self.sched.nodes)) else 0.0  # (not the voices' phase)
        if not boards and not sheet_yuan:
            return
        if not self.guard.fits_all([(n.estimate_yuan, "storyboard") for n in boards]
                                   + [(sheet_yuan, "contact_sheet")], keep=self.stop_yuan()):
            self.stopping = True
            margin = self.guard.margin_for("storyboard")
            cost = (sum(n.estimate_yuan for n in boards) + sheet_yuan) * margin
            self.out.budget_note = (
                f"the budget does not cover the storyboard: ¥{cost:.5f} for its panels and contact sheet at this "
                f"cluster's margin {margin:.2f}, with ¥{self.guard.spent:.5f} spent and ¥{self.stop_yuan():.5f} kept "
                "to stop running nodes; nothing was started and there is no contact sheet")
            return
        if sheet_yuan:
            self.guard.reserve("contact_sheet", sheet_yuan, stage="contact_sheet", learn=False)
        if self.guard.capped and not self.guard.known("storyboard") and len(boards) > 1:
            # Learn before widening: one panel measures how far this machine runs from the rows
            # before the others (and the voices) are admitted at the margin it teaches.
            boards, self.boards_waiting = boards[:1], boards[1:]
        self.submit_boards(boards)

    def submit_boards(self, boards: list[Node]) -> None:
        if not boards:
            return
        entry, settings = self.entries["storyboard"]
        task = self.cluster.task(storyboard_node)
        shots = {s.shot.id: s for s in self.plan.shots}
        p = self.plan.profile
        for n in boards:
            self.submit(n, task.remote(shots[n.id.item], entry=entry, settings=settings, width=p.storyboard_width,
                                       aspect=p.aspect, work=self.work))

    def more_boards(self) -> None:
        """The panels held back, once the first one has taught the storyboard's margin: all of them
        if they fit at it, else none (the render stops without a contact sheet, and says so)."""
        if not self.boards_waiting or self.stopping or any(f.node.stage == "storyboard"
                                                           for f in self.in_flight.values()):
            return
        if not self.guard.known("storyboard"):  # it came back with no lesson (another render made it)
            first, self.boards_waiting = self.boards_waiting[:1], self.boards_waiting[1:]
            self.submit_boards(first)
            return
        waiting, self.boards_waiting = self.boards_waiting, []
        if not self.guard.fits_all([(n.estimate_yuan, "storyboard") for n in waiting], keep=self.stop_yuan()):
            self.stopping = True
            margin = self.guard.margin_for("storyboard")
            self.guard.release("contact_sheet")
            self.out.budget_note = (
                f"the budget does not cover the storyboard: its first panel ran {self.guard.ratio('storyboard'):.2f}× "
                f"its estimate, so the other {len(waiting)} cost ¥{sum(n.estimate_yuan for n in waiting) * margin:.5f} "
                f"at this cluster's margin {margin:.2f}, with ¥{self.guard.spent:.5f} spent; they were not started "
                "and there is no contact sheet")
            return
        self.submit_boards(waiting)

    def voices(self) -> None:
        """Every line the schedule says to speak, in one task on the voice backend's resources (it
        builds the backend once), each line its own node; none when the budget does not cover them."""
        lines = self.sched.where("run", "voice")
        if self.voiced or self.boards_waiting:
            return  # under a budget the voices wait for the first panel's lesson
        self.voiced = True
        if not lines or self.stopping:
            return
        if not self.guard.fits_all([(n.estimate_yuan, "voice") for n in lines], keep=self.stop_yuan()):
            self.out.budget_note = self.out.budget_note or "the budget does not cover the voices"
            return
        p = self.plan.profile
        entry, settings = p.entry("voice"), p.settings_for("voice")
        held = entry.resources(settings)
        self.cluster.check(held, f"the {entry.name} voice backend")
        by_id = {v.id: v for v in self.plan.voices}
        batch = [by_id[n.id.item] for n in lines]
        actor = self.voice_actor(entry, settings, held) if entry.actor else None
        if actor is not None:
            refs = actor.speak.options(num_returns=len(lines)).remote(batch)
        else:
            task = self.cluster.task(voice_node, held).options(num_returns=len(lines))
            refs = task.remote(batch, entry=entry, settings=settings, work=self.work)
        for n, ref in zip(lines, refs if len(lines) > 1 else [refs]):
            self.submit(n, ref, held, actor=actor, group=-1)  # lines are spoken one after another: each its own lease

    def voice_actor(self, entry: Any, settings: Any, held: Resources) -> Any:
        """A model-holding voice backend's actor, started and loaded (its start billed as ``model_load``);
        a backend that cannot load is one line, before any line is spoken."""
        import ray

        worker = ray.remote(num_cpus=1, num_gpus=held.gpus or None)(VoiceWorker)
        submitted = time.time()
        actor = worker.remote(entry=entry, settings=settings, work=self.work)
        try:
            up = get(actor.startup.remote(), NodeId("voice", f"{entry.name} backend"))
        except NodeError as exc:
            ray.kill(actor)
            raise AnimError(f"the {entry.name} voice backend could not start: {exc.problem}; nothing was "
                            "rendered") from exc
        load_s = max(up["created"] - submitted, 0.0) + up["load_s"]
        self.voice_startups.append(self.prices.record("model_load", None, load_s, held.resource, held.units))
        self.voice_actors.append(actor)
        return actor

    def chains(self) -> list[ShotPlan]:
        """Shots whose clip must be made: scheduled first, then those standing by for budget."""
        state = {n.id.item: n for n in self.sched.nodes if n.id.stage == "clip"}
        run = [s for s in self.plan.shots if s.shot.id in state and state[s.shot.id].state == "run"]
        standby = [s for s in self.plan.shots if s.shot.id in state and state[s.shot.id].state == "held"
                   and state[s.shot.id].reason == "budget"]
        order = {n.id.item: i for i, n in enumerate(self.sched.nodes)}
        return sorted(run, key=lambda s: order[s.shot.id]) + standby

    def admit(self, queue: list[ShotPlan]) -> None:
        """Submit every queued chain that fits the budget now (its plates and sheets first); with a
        budget, one chain at a time while its stages' ratios are unknown."""
        if self.stopping:
            return
        if self.guard.capped and (self.boards_waiting or any(f.node.stage == "storyboard"
                                                             for f in self.in_flight.values())):
            return  # the storyboard comes first, and teaches the first margin
        batch: list[ShotPlan] = []
        for shot in list(queue):
            kf, clip = self.sched[NodeId("keyframes", shot.shot.id)], self.sched[NodeId("clip", shot.shot.id)]
            needs = [self.sched[n] for n in prerequisites(self.plan, shot) if self.sched.get(n) is not None]
            new = [n for n in needs if n.state != "hit" and n.id not in self.refs and n.id not in self.out.done]
            runs = ([kf] if kf.state != "hit" else []) + [clip]
            learning = self.guard.capped and not all(self.guard.known(n.id.stage) for n in runs)
            if learning and self.learning:
                break  # learn before widening: the chain in flight measures these stages first
            if not self.guard.fits_all([(n.estimate_yuan, n.id.stage) for n in new + runs], keep=self.stop_yuan()):
                continue
            queue.remove(shot)
            if learning:
                self.learning.add(shot.shot.id)
            for n in needs:
                if n.state == "hit" and n.id not in self.out.done:
                    self.hit(n)  # a plate or sheet this chain reads from the store
            for n in new:
                ref, actor = self.pool.prerequisite(n)
                self.submit(n, ref, self.pool.held, actor=actor, learn=False)
            if kf.state == "hit":
                self.clip(shot, None, clip)
            else:
                self.guard.reserve(kf.id, kf.estimate_yuan, stage="keyframes")
                batch.append(shot)
            if learning:
                break
        held = self.entries["keyframes"][0].resources(self.entries["keyframes"][1])
        for shot, ref, share, actor, group in self.keyframes(batch) if batch else []:
            kf = self.sched[NodeId("keyframes", shot.shot.id)]
            after = (NodeId("storyboard", shot.shot.id), *prerequisites(self.plan, shot))
            self.submit(kf, ref, held, share=share, after=after, actor=actor, group=group, reserve=False)
            self.clip(shot, ref, self.sched[NodeId("clip", shot.shot.id)])

    def keyframes(self, batch: list[ShotPlan]) -> list[tuple[ShotPlan, Any, float, Any, int | None]]:
        """One task per shot, or batches across shots on the model actors: (shot, ref, share, actor, batch)."""
        after = [self.refs[NodeId("storyboard", s.shot.id)] for s in batch if NodeId("storyboard", s.shot.id) in self.refs]
        if self.pool is not None:
            deps = [self.refs[n] for s in batch for n in prerequisites(self.plan, s) if n in self.refs]
            return self.pool.keyframes(batch, deps + after)
        entry, settings = self.entries["keyframes"]
        task = self.cluster.task(keyframes_node, entry.resources(settings))
        return [(s, task.remote(s, self.refs.get(NodeId("storyboard", s.shot.id)), entry=entry, settings=settings,
                                width=self.plan.width, height=self.plan.height, work=self.work), 1.0, None, None)
                for s in batch]

    def clip(self, shot: ShotPlan, kf_ref: Any, node: Node) -> None:
        entry, settings = self.entries["inbetween"]
        held = entry.resources(settings)
        task = self.cluster.task(clip_node, held)
        ref = task.remote(shot, kf_ref, entry=entry, settings=settings, profile=self.plan.profile,
                          width=self.plan.width, height=self.plan.height, ffmpeg=self.ffmpeg, work=self.work)
        self.submit(node, ref, held, after=(NodeId("keyframes", shot.shot.id),), with_cpu=True)

    # ---- 4. the cap, while nodes run
    def watch(self) -> None:
        """Charge running nodes' cost so far; cancel what the budget can no longer carry."""
        now = time.time()
        self.looked = (self.looked + [now])[-20:]
        ahead_s = self.ahead_s()
        running, ready = [], []
        for ref, f in self.in_flight.items():
            if f.group is not None and f.finished is None:
                # A call that makes several nodes returns them together: a node of it that finished
                # meanwhile has its spend note in the store already (and may have started and ended
                # between two looks, its lease never seen), and costs what the note says.
                done = ledger.finished_by(self.store, f.key, self.work.holder)
                f.finished = None if done is None else sum(r.yuan for r in done.rows)
            if f.finished is not None:
                self.guard.accrue(f.node, f.finished)
                continue
            if f.lease is None and not any(a in self.refs and a not in self.out.done for a in f.after):
                got = current_lease(self.store, f.key)  # its inputs are done: it may have started
                if got is not None and got.holder == self.work.holder:
                    f.lease = got
                else:
                    ready.append(f)  # may start before the next look
            if f.lease is not None:
                self.guard.accrue(f.node, f.cost_so_far(now))
                running.append(ref)
        # What stopping costs: the running nodes, and as many ready ones as free slots, for ahead_s.
        starting = sorted((f.rate * f.share for f in ready), reverse=True)[:max(int(self.slots) - len(running), 0)]
        ahead = ahead_s * (sum(self.in_flight[r].rate * self.in_flight[r].share for r in running) + sum(starting))
        if running and self.guard.over(ahead):
            self.out.cap_reached = True
            self.cancel(list(self.in_flight), ending=True)
            return
        if not running and self.guard.over():
            self.out.cap_reached = True  # a node finished past the budget between two looks: nothing more starts
        for ref in reversed(list(self.in_flight)):  # not started yet: free to drop, latest first
            if not self.guard.overcommitted():
                break
            f = self.in_flight.get(ref)
            if f is not None and f.lease is None:
                self.cancel([ref])

    def ahead_s(self) -> float:
        """How long before the budget the cap must start stopping nodes (see STOP_AHEAD_S)."""
        gaps = [b - a for a, b in zip(self.looked, self.looked[1:])]
        return max([STOP_AHEAD_S, self.cancel_s + POLL_S] + [2 * g for g in gaps])

    def stop_yuan(self) -> float:
        """What stopping every slot of the cluster would cost: admission leaves it untouched, so
        that a node is not started only for the cap to cancel it at once."""
        if not self.guard.capped:
            return 0.0
        if not self.slots:
            self.cluster.start()  # only asked when there is something to submit
            self.slots = max(sum(self.cluster.resources().values()), 1.0)
        return self.slots * self.prices.cost(self.ahead_s(), "cpu", 1.0)

    def cancel(self, refs: list[Any], *, ending: bool = False) -> None:
        """Cancel nodes in flight (and what waits for them): tasks are killed, model actors with a
        running node killed; each is billed from its lease's start to the confirmed cancel.

        ``ending``: nothing more is submitted after this (a failure, the cap). Then a node that has
        not started is not cancelled in Ray but told to stop through the store (``ledger.stop``: it
        ends at its claim, having computed nothing) and collected when it does: Ray's cancel of a
        task it is dispatching at that moment — one whose inputs just failed or finished — kills
        the driver ("Tried to complete task that was not pending", Ray 2.60). Only nodes that hold
        their lease, so run on a worker, are cancelled at once; one told to stop that has not come
        back within ``STOP_WAIT_S`` is still queued for resources (a shared cluster), not being
        dispatched, and is cancelled in Ray then. Cancels go dependents first, so that no cancel
        makes another node ready to dispatch."""
        import ray

        doomed = dict.fromkeys(r for r in refs if r in self.in_flight)
        grew = True
        while grew:  # what waits for a doomed node, and what shares a doomed actor, goes too
            gone = {self.in_flight[r].node for r in doomed}
            groups = {self.in_flight[r].group for r in doomed} - {None}
            killed = {id(self.in_flight[r].actor) for r in doomed
                      if self.in_flight[r].actor is not None and self.in_flight[r].lease is not None}
            more = [r for r, f in self.in_flight.items() if r not in doomed
                    and (set(f.after) & gone or f.group in groups - {None}
                         or (f.actor is not None and id(f.actor) in killed))]
            doomed.update(dict.fromkeys(more))
            grew = bool(more)
        order = [r for r in reversed(self.in_flight) if r in doomed]  # submitted later: waits on earlier ones
        if ending:
            for ref in order:
                ledger.stop(self.store, self.in_flight[ref].key, self.work.holder)
            for ref in order:  # those that took their lease before the word reached them run on
                f = self.in_flight[ref]
                got = f.lease or current_lease(self.store, f.key)
                f.lease = got if got is not None and got.holder == self.work.holder else None
        actors = {id(self.in_flight[r].actor): self.in_flight[r].actor for r in order
                  if self.in_flight[r].actor is not None and self.in_flight[r].lease is not None}
        for actor in actors.values():
            if self.pool is not None and actor in self.pool.actors:
                self.pool.kill(actor)
            else:
                ray.kill(actor)

        def cancel_in_ray(ref: Any) -> None:
            if self.in_flight[ref].actor is None:
                ray.cancel(ref, force=True)
            elif id(self.in_flight[ref].actor) not in actors:
                ray.cancel(ref)  # queued on an actor that lives on

        def collect(refs: list[Any]) -> None:  # each billed to when its end is confirmed
            for ref in refs:
                flight = self.in_flight.pop(ref)
                try:
                    measured = ray.get(ref)
                except (ray.exceptions.RayError, AnimError):
                    self.bill_cancelled(flight, time.time())
                else:  # it finished before the cancel reached it
                    self.take(measured, flight)
                if ending:
                    ledger.unstop(self.store, flight.key, self.work.holder)

        told = [r for r in order if ending and self.in_flight[r].lease is None]  # they stop at their claim
        now = [r for r in order if self.in_flight[r].lease is not None or not ending]
        t0 = time.time()
        for ref in now:
            cancel_in_ray(ref)
        collect(now)
        if told:  # one still queued for resources (a shared cluster) is not being dispatched: Ray cancels it
            _, late = ray.wait(told, num_returns=len(told), timeout=STOP_WAIT_S)
            late = set(late)
            if late:
                log.info("%d node(s) told to stop were still queued for resources after %.0f s: cancelled in Ray",
                         len(late), STOP_WAIT_S)
            for ref in (r for r in told if r in late):
                cancel_in_ray(ref)
            collect(told)
        self.cancel_s = max(self.cancel_s, time.time() - t0)

    def bill_cancelled(self, flight: _Flight, ended: float) -> None:
        """A cancelled node: its finished spend note if it got that far, else its partial time from
        its lease's start (a node that never took its lease cost nothing)."""
        self._landed(flight)
        self.guard.release(flight.node)
        got = flight.lease or current_lease(self.store, flight.key)
        mine = got is not None and got.holder == self.work.holder
        done = ledger.finished_by(self.store, flight.key, self.work.holder)
        if done is not None and mine and self.store.get(flight.key) is None:
            lost = ledger.finished_at(self.store, flight.key, self.work.holder, got.generation)
            if lost is not None:  # killed between its spend note and its commit: spent on nothing
                done = ledger.unfinished(self.store, lost, got.generation, ledger.CANCELLED)
        if done is not None:  # killed after its spend note: its rows are what it cost
            rows = done.rows
        elif mine:
            seconds = max(ended - got.started, 0.0) * flight.share
            rows = ledger.partial_rows(self.prices, flight.node, seconds, flight.resource, flight.units)
            ledger.record(self.store, ledger.Spent(str(flight.node), flight.key, self.work.holder, rows, got.started,
                                                   ended, ledger.CANCELLED), got.generation)
        else:
            return  # it never started (or waited on another render's lease): it cost nothing
        if mine:
            clear_lease(self.store, got)  # its worker is gone: nobody need wait out its expiry
        rows = self.earlier_attempts(flight) + rows
        yuan = sum(r.yuan for r in rows)
        self.out.records += rows
        self.guard.charge(yuan)
        if done is None or done.why is not None:
            self.out.cancelled.append(flight.node)
            self.out.cancelled_yuan += yuan
        if self.on_node:
            self.on_node(flight.node, rows)

    # ---- 5. the episode node, and the contact sheet
    def episode_node(self) -> bool:
        """Once nothing else runs: assemble when every clip is in the store and it fits, else the
        contact sheet when every panel is (if it is not made already). False when there is
        nothing (more) to do."""
        A, C = NodeId("assemble"), NodeId("contact_sheet")
        if self.out.finish is not None:
            return False
        if A in self.out.done:  # it ran, or another render made it meanwhile
            self.out.finish = A
            return False
        if all(NodeId("clip", s.shot.id) in self.out.done for s in self.plan.shots) and A not in self.refs \
                and all(NodeId("voice", v.id) in self.out.done for v in self.plan.voices) and not self.stopping:
            # a stored assembly costs nothing: no budget question, and no cluster started to ask it
            if self.store.get(self.plan.assemble_key) is not None or self.guard.fits(
                    self.plan.assemble_estimate_yuan, "assemble", keep=self.stop_yuan()):
                return self.episode_level(A)
            self.out.budget_note = self.out.budget_note or "the budget does not cover the assembly"
        if C in self.out.done:
            self.out.finish = C
            return False
        return self.contact_sheet()

    def contact_sheet(self) -> bool:
        """The contact sheet, once every panel is in the store (under a budget, as soon as they are:
        it is paid from the budget before the chains can use it up)."""
        C = NodeId("contact_sheet")
        if C in self.refs or C in self.out.done or not all(
                NodeId("storyboard", s.shot.id) in self.out.done for s in self.plan.shots):
            return False
        if self.out.cap_reached and self.store.get(self.plan.contact_sheet_key) is None:
            return False  # the budget is spent: it would only be cancelled
        self.guard.release("contact_sheet")  # its reservation becomes the node's own
        return self.episode_level(C)

    def episode_level(self, node: NodeId) -> bool:
        """Submit an episode-level node (or take it from the store); True: there is more to wait for."""
        if node == NodeId("assemble"):
            key, fn, estimate = self.plan.assemble_key, assemble_node, self.plan.assemble_estimate_yuan
            kwargs: dict[str, Any] = {"ffmpeg": self.ffmpeg, "work": self.work}
        else:
            key, fn, estimate = self.plan.contact_sheet_key, contact_sheet_node, contact_sheet_estimate(self.plan)
            kwargs = {"work": self.work}
        if self.store.get(key) is not None:
            self.hit(Node(node, key, "hit"))
            return True  # nothing in flight: the caller looks again and finishes with it
        self.submit(Node(node, key, "run", estimate_yuan=estimate), self.cluster.task(fn).remote(self.plan, **kwargs))
        return True

    # ---- the whole run
    def execute(self) -> Execution:
        import ray

        # 1. Model backends load and GPUs are checked first: their errors come before any work.
        self.prepare()
        # 2. Hits are ledger rows at ¥0 (plates and sheets only once a chain reads them).
        for n in self.sched.where("hit"):
            if n.id.stage not in ("assemble", "contact_sheet", "plates", "sheets"):
                self.hit(n)
        # 3. Storyboards, then every chain the budget admits; more as actual costs come back; then
        #    the episode node (the contact sheet if the episode cannot be assembled).
        try:
            self.storyboards()
            self.voices()
            queue = self.chains()
            self.admit(queue)
            self.progress()
            while True:
                while self.in_flight:
                    ready, _ = ray.wait(list(self.in_flight), num_returns=1,
                                        timeout=POLL_S if self.guard.capped else None)
                    for ref in ready:
                        flight = self.in_flight.pop(ref)
                        self.take(get(ref, flight.node, 1 if flight.actor is not None else 1 + RETRIES), flight)
                    if self.boards_waiting:
                        self.more_boards()
                        self.voices()
                    if self.guard.capped:
                        self.watch()
                        self.stopping = self.stopping or self.out.cap_reached
                        if not self.stopping:
                            self.contact_sheet()
                    if queue:
                        self.admit(queue)
                    self.progress()
                self.looked = []  # nothing ran meanwhile: no gap to learn from
                if not self.episode_node():
                    break
        except AnimError:
            self.abandon()
            raise
        self.out.finish = self.out.finish or next((n for n in (NodeId("assemble"), NodeId("contact_sheet"))
                                                   if n in self.out.done), None)
        # 4. Character consistency of a freshly drawn episode (model backends).
        if self.pool is not None and self.out.finish == NodeId("assemble") and self.sched.where("run", "keyframes"):
            shots = [s for s in self.plan.shots if s.shot.characters]
            if shots and self.pool.actors:
                self.out.consistency = get(self.pool.consistency(shots), NodeId("consistency"))
        if self.out.cap_reached and self.out.finish != NodeId("assemble"):
            sheet = "" if self.out.finish == NodeId("contact_sheet") else (
                "; the storyboard was not finished, so there is no contact sheet")
            self.out.budget_note = self.out.budget_note or (
                f"the budget cap stopped {len(self.out.cancelled)} running node(s), their partial time billed{sheet}"
                if self.out.cancelled else
                f"the budget was reached by a node that finished past its estimate; nothing more was started{sheet}")
        self.out.cluster = self.cluster.resources()
        self.out.ray_init_seconds = 0.0 if self.ray_was_up else self.cluster.init_seconds  # this render's start only
        self.out.startups = (list(self.pool.startups) if self.pool is not None else []) + self.voice_startups
        for actor in self.voice_actors:  # its lines are spoken: its GPU goes back
            ray.kill(actor)
        return self.out

    def progress(self) -> None:
        if self.on_progress:
            done = sum(NodeId("clip", s.shot.id) in self.out.done for s in self.plan.shots)
            self.on_progress(done, len(self.plan.shots), self.guard.spent - self.spent_before)

    def abandon(self) -> None:
        """After a node failed: cancel what is in flight (billing the time it ran) and collect it,
        so no other failure is left for Ray to print. Nodes that finished are in the store."""
        try:
            self.cancel(list(self.in_flight), ending=True)
        except Exception:  # the first failure is the one to report
            self.in_flight.clear()


def execute(plan: RenderPlan, sched: Schedule, *, store: Store, prices: PriceCatalog, ffmpeg: str,
            cluster: Cluster | None = None, budget_yuan: float | None = None, margin: float = 0.25,
            spent_yuan: float = 0.0, history: dict[str, tuple[float, float]] | None = None,
            work: Work | None = None,
            on_progress: Callable[[int, int, float], None] | None = None,
            on_node: Callable[[NodeId, list[LedgerRecord]], None] | None = None) -> Execution:
    """Run the nodes ``sched`` says must run (and those held for budget, if actual costs leave
    room); return the priced ledger rows and what is now in the store.

    ``budget_yuan`` caps ``spent_yuan`` (already spent) plus what this execution spends;
    ``history`` (stage -> Σ actual, Σ estimated yuan on this cluster's earlier renders of the
    episode) starts the margins.
    ``work`` names the render (its leases and spend notes; a fresh id by default).
    ``on_progress(shots done, shots, yuan spent by this execution)`` and ``on_node(node, its
    priced rows)`` are called on the driver as nodes finish or are cancelled (the tracker logs
    from them)."""
    work = work or Work(store=store.url, holder=uuid.uuid4().hex[:12], prices=prices)
    guard = BudgetGuard(budget_yuan, margin, spent=spent_yuan, history=history)
    return _Run(plan, sched, store=store, prices=prices, ffmpeg=ffmpeg, cluster=cluster or Cluster(), guard=guard,
                work=work, on_progress=on_progress, on_node=on_node).execute()
