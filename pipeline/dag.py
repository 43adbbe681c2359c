"""Schedule → Ray task graph → measured, priced ledger rows. The only module that imports Ray.

The executor submits the nodes a ``pipeline.schedule.Schedule`` says must run, per shot as a
chain of remote tasks linked by ObjectRefs, so Ray's own dependency resolution schedules it::

    storyboard ─► keyframes (+ audit drawing) ─► clip (in-betweens streamed into the encoder)
    every shot's clip and panel ───────────────► assemble (or the contact sheet alone)

Hits are not submitted; they are cached ledger rows at ¥0. A model-holding keyframe backend
runs as a pool of actors (loaded once, batches across shots; plates and sheets first).
Every executed node returns its measured seconds and the resources it held; the executor
prices them. With a budget, a shot's chain is submitted only while spent + running + its
estimate (× a margin that learns from this render's overruns) fits: chains the schedule held
for budget stand by and are admitted if actual costs leave room.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.budget import BudgetGuard
from pipeline.cost import PriceCatalog
from pipeline.models import LedgerRecord, RenderPlan, ShotPlan
from pipeline.nodes import (KeyframeWorker, Measured, assemble_node, clip_node, contact_sheet_node, keyframes_node,
                            storyboard_node)
from pipeline.registry import Resources
from pipeline.schedule import Node, NodeId, Schedule, prerequisites
from pipeline.store import Store
from stages.records import AnimError, NodeError


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
    stage_seconds: float = 0.0  # resource-seconds inside nodes, as the ledger bills them


class Cluster:
    """Ray, started on first use: a render whose every node is a hit never starts it.

    With no address, a new local cluster of its own (``address="local"``), never one that
    happens to be running on the machine; with ``RAY_ADDRESS``, that cluster, with this
    package's code shipped as ``py_modules``.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        self.address, self.num_cpus, self.init_seconds, self.started = address, num_cpus, 0.0, False

    def start(self) -> None:
        if self.started:
            return
        import ray

        t0 = time.perf_counter()
        if not ray.is_initialized():
            if self.address:
                self._connect(ray)
            else:
                ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, logging_level="WARNING",
                         log_to_driver=False)
        self.init_seconds, self.started = time.perf_counter() - t0, True

    def _connect(self, ray: Any) -> None:
        import pipeline
        import stages

        _check_reachable(self.address)
        try:
            ray.init(address=self.address, logging_level="WARNING", log_to_driver=False,
                     runtime_env={"py_modules": [str(Path(pipeline.__file__).parent),
                                                 str(Path(stages.__file__).parent)]})
        except (ConnectionError, RuntimeError) as exc:
            raise AnimError(f"cannot reach the Ray cluster at RAY_ADDRESS={self.address}: {exc}; nothing was "
                            "rendered (unset RAY_ADDRESS to render on a local cluster)") from None

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
        return ray.remote(num_cpus=held.cpus, num_gpus=held.gpus or None)(fn)

    def resources(self) -> dict[str, float]:
        """What the render held: the cluster's CPUs and GPUs, or nothing if Ray never started."""
        if not self.started:
            return {}
        import ray

        return {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}


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


def get(ref: Any, node: NodeId) -> Any:
    """``ray.get`` that raises the node's own error: a NodeError naming the node (the worker's
    traceback in ``remote_traceback``), whatever failed — the stage, the worker or the actor."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, AnimError):
            raise exc.cause from None
        raise NodeError(str(node), f"{type(exc.cause).__name__}: {exc.cause}", str(exc)) from None
    except ray.exceptions.RayError as exc:  # a worker or actor that died: no cause to carry
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise NodeError(str(node), f"{type(exc).__name__}: {first}", str(exc)) from None


class _ActorPool:
    """Model actors for a model-holding keyframe backend: ``actors`` replicas (the backend's
    ``actors`` setting, 1 if it has none), each holding the backend's resources."""

    def __init__(self, cluster: Cluster, plan: RenderPlan, url: str):
        p = plan.profile
        self.entry, self.settings = p.entry("keyframes"), p.settings_for("keyframes")
        self.held = self.entry.resources(self.settings)
        self.plan, self.url, self.cluster = plan, url, cluster
        self.n = getattr(self.settings, "actors", 1)
        self.batch_size = getattr(self.settings, "batch_size", 4)
        self.actors: list[Any] = []
        self.turn = 0

    def start(self) -> None:
        """Create the actors and wait until each has loaded its model: a missing model, no GPU or a
        model that does not fit is reported here, before any node is submitted."""
        import ray

        self.cluster.check(self.held, f"the {self.entry.name} keyframe backend")
        actor = ray.remote(num_cpus=1, num_gpus=self.held.gpus or None)(KeyframeWorker)
        p = self.plan
        self.actors = [actor.remote(entry=self.entry, settings=self.settings, width=p.width, height=p.height,
                                    store=self.url) for _ in range(self.n)]
        try:
            for a in self.actors:
                get(a.ready.remote(), NodeId("keyframes", f"{self.entry.name} backend"))
        except NodeError as exc:
            raise AnimError(f"the {self.entry.name} backend could not start: {exc.problem}; nothing was "
                            "rendered") from exc

    def _next(self) -> Any:
        if not self.actors:
            self.start()
        self.turn += 1
        return self.actors[self.turn % len(self.actors)]

    def prerequisite(self, node: Node) -> Any:
        """A background plate or a character sheet, drawn once into the store."""
        actor = self._next()
        if node.id.stage == "plates":
            return actor.plate.remote(node.key, self.plan.plates[node.key])
        name = next(n for n, k in self.plan.sheets.items() if k == node.key)
        return actor.sheet.remote(node.key, name)

    def keyframes(self, shots: list[ShotPlan], deps: list[Any]) -> list[tuple[ShotPlan, Any]]:
        """Batches of shots, about ``2 × batch_size`` keyframes each, round-robin over the actors."""
        out, group, count = [], [], 0
        for i, shot in enumerate(shots):
            group.append(shot)
            count += len(shot.keyframes) + (shot.audit_frame is not None)
            if count >= 2 * self.batch_size or i == len(shots) - 1:
                plates = {s.keys["plate"]: self.plan.plates[s.keys["plate"]] for s in group if "plate" in s.keys}
                sheets = {n: self.plan.sheets[n] for s in group for n in s.shot.characters if n in self.plan.sheets}
                refs = self._next().keyframes.options(num_returns=len(group)).remote(group, plates, sheets, *deps)
                out += zip(group, refs if len(group) > 1 else [refs])
                group, count = [], 0
        return out

    def consistency(self, shots: list[ShotPlan]) -> Any:
        return self._next().consistency.remote(shots)


class _Run:
    """One execution of a schedule: what is in flight, what the budget allows, the ledger."""

    def __init__(self, plan: RenderPlan, sched: Schedule, *, store: Store, prices: PriceCatalog, ffmpeg: str,
                 cluster: Cluster, budget_yuan: float | None, margin: float,
                 on_progress: Callable[[int, int, float], None] | None,
                 on_node: Callable[[NodeId, list[LedgerRecord]], None] | None = None):
        self.plan, self.sched, self.store, self.prices, self.ffmpeg = plan, sched, store, prices, ffmpeg
        self.cluster, self.on_progress, self.on_node = cluster, on_progress, on_node
        self.ray_was_up = cluster.started
        self.guard = BudgetGuard(budget_yuan, margin)
        self.out = Execution()
        self.in_flight: dict[Any, NodeId] = {}
        self.refs: dict[NodeId, Any] = {}  # submitted node -> its ref (inputs of later nodes)
        p = plan.profile
        self.entries = {stage: (p.entry(stage), p.settings_for(stage)) for stage in ("storyboard", "keyframes",
                                                                                      "inbetween")}
        kf_entry, kf_settings = self.entries["keyframes"]
        self.pool = _ActorPool(cluster, plan, store.url) if kf_entry.actor else None

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

    def take(self, measured: Measured, node: NodeId) -> None:
        """Price a finished node into the ledger and charge it; release its reservation."""
        rows = [self.prices.record(t.stage, measured.node.shot, t.seconds, t.resource, t.units)
                for t in measured.timings]
        self.out.records += rows
        self.out.stage_seconds += sum(t.seconds * t.units for t in measured.timings)
        yuan = sum(r.yuan for r in rows)
        self.guard.charge(yuan)
        self.guard.finish(node, yuan)  # the margin learns how far off estimates run
        self.out.spans.append(("+".join(t.stage for t in measured.timings), *measured.span))
        if measured.quality and measured.node.shot:
            self.out.quality[measured.node.shot] = measured.quality
        self.out.done.add(node)
        if self.on_node:
            self.on_node(node, rows)

    # ---- 3. submission
    def submit(self, node: NodeId, ref: Any, estimate: float, *, learn: bool = True) -> None:
        self.in_flight[ref], self.refs[node] = node, ref
        self.guard.reserve(node, estimate, learn=learn)

    def storyboards(self) -> None:
        boards = self.sched.where("run", "storyboard")
        if not boards:
            return
        entry, settings = self.entries["storyboard"]
        task = self.cluster.task(storyboard_node)
        shots = {s.shot.id: s for s in self.plan.shots}
        p = self.plan.profile
        for n in boards:
            self.submit(n.id, task.remote(shots[n.id.item], entry=entry, settings=settings, width=p.storyboard_width,
                                          aspect=p.aspect, store=self.store.url), n.estimate_yuan)

    def chains(self) -> list[ShotPlan]:
        """Shots whose clip must be made: scheduled first, then those standing by for budget."""
        state = {n.id.item: n for n in self.sched.nodes if n.id.stage == "clip"}
        run = [s for s in self.plan.shots if state[s.shot.id].state == "run"]
        standby = [s for s in self.plan.shots if state[s.shot.id].state == "held" and state[s.shot.id].reason == "budget"]
        order = {n.id.item: i for i, n in enumerate(self.sched.nodes)}
        return sorted(run, key=lambda s: order[s.shot.id]) + standby

    def admit(self, queue: list[ShotPlan]) -> None:
        """Submit every queued chain that fits the budget now (its plates and sheets first)."""
        batch: list[ShotPlan] = []
        for shot in list(queue):
            kf, clip = self.sched[NodeId("keyframes", shot.shot.id)], self.sched[NodeId("clip", shot.shot.id)]
            needs = [self.sched[n] for n in prerequisites(self.plan, shot) if self.sched.get(n) is not None]
            new = [n for n in needs if n.state != "hit" and n.id not in self.refs]
            cost = clip.estimate_yuan + sum(n.estimate_yuan for n in new + [kf] if n.state != "hit")
            if not self.guard.fits(cost):
                continue
            queue.remove(shot)
            for n in needs:
                if n.state == "hit" and n.id not in self.out.done:
                    self.hit(n)  # a plate or sheet this chain reads from the store
            for n in new:
                self.submit(n.id, self.pool.prerequisite(n), n.estimate_yuan, learn=False)
            if kf.state == "hit":
                self.clip(shot, None, clip)
            else:
                self.guard.reserve(kf.id, kf.estimate_yuan)
                batch.append(shot)
        for shot, ref in self.keyframes(batch) if batch else []:
            node = NodeId("keyframes", shot.shot.id)
            self.in_flight[ref], self.refs[node] = node, ref
            self.clip(shot, ref, self.sched[NodeId("clip", shot.shot.id)])

    def keyframes(self, batch: list[ShotPlan]) -> list[tuple[ShotPlan, Any]]:
        """One task per shot, or batches across shots on the model actors."""
        after = [self.refs[NodeId("storyboard", s.shot.id)] for s in batch if NodeId("storyboard", s.shot.id) in self.refs]
        if self.pool is not None:
            deps = [self.refs[n] for s in batch for n in prerequisites(self.plan, s) if n in self.refs]
            return self.pool.keyframes(batch, deps + after)
        entry, settings = self.entries["keyframes"]
        task = self.cluster.task(keyframes_node, entry.resources(settings))
        return [(s, task.remote(s, self.refs.get(NodeId("storyboard", s.shot.id)), entry=entry, settings=settings,
                                width=self.plan.width, height=self.plan.height, store=self.store.url)) for s in batch]

    def clip(self, shot: ShotPlan, kf_ref: Any, node: Node) -> None:
        entry, settings = self.entries["inbetween"]
        task = self.cluster.task(clip_node, entry.resources(settings))
        ref = task.remote(shot, kf_ref, entry=entry, settings=settings, profile=self.plan.profile,
                          width=self.plan.width, height=self.plan.height, ffmpeg=self.ffmpeg, store=self.store.url)
        self.submit(node.id, ref, node.estimate_yuan)

    # ---- 4. the episode node
    def finish(self) -> None:
        """Assemble when every clip is in the store, else the contact sheet when every panel is."""
        if all(NodeId("clip", s.shot.id) in self.out.done for s in self.plan.shots):
            node, key, estimate = NodeId("assemble"), self.plan.assemble_key, self.plan.assemble_estimate_yuan
            fn, kwargs = assemble_node, {"ffmpeg": self.ffmpeg, "store": self.store.url}
        elif all(NodeId("storyboard", s.shot.id) in self.out.done for s in self.plan.shots):
            node, key = NodeId("contact_sheet"), self.plan.contact_sheet_key
            estimate = self.plan.shots[0].estimate_yuan["storyboard"] if self.plan.shots else 0.0
            fn, kwargs = contact_sheet_node, {"store": self.store.url}
        else:
            return
        if self.store.get(key) is not None:
            self.hit(Node(node, key, "hit"))
        elif self.guard.fits(estimate):
            self.guard.reserve(node, estimate)
            self.take(get(self.cluster.task(fn).remote(self.plan, **kwargs), node), node)
        else:
            return
        self.out.finish = node

    # ---- the whole run
    def execute(self) -> Execution:
        # 1. Model backends load and GPUs are checked first: their errors come before any work.
        self.prepare()
        # 2. Hits are ledger rows at ¥0 (plates and sheets only once a chain reads them).
        for n in self.sched.where("hit"):
            if n.id.stage not in ("assemble", "contact_sheet", "plates", "sheets"):
                self.hit(n)
        # 3. Storyboards, then every chain the budget admits; more as actual costs come back.
        try:
            self.storyboards()
            queue = self.chains()
            self.admit(queue)
            self.progress()
            while self.in_flight:
                import ray

                ready, _ = ray.wait(list(self.in_flight), num_returns=1)
                node = self.in_flight.pop(ready[0])
                self.take(get(ready[0], node), node)
                if queue:
                    self.admit(queue)
                self.progress()
        except AnimError:
            self.abandon()
            raise
        # 4. The episode, or the contact sheet of a render that stops early.
        self.finish()
        if self.pool is not None and self.out.finish == NodeId("assemble") and self.sched.where("run", "keyframes"):
            shots = [s for s in self.plan.shots if s.shot.characters]
            if shots:
                self.out.consistency = get(self.pool.consistency(shots), NodeId("consistency"))
        self.out.cluster = self.cluster.resources()
        self.out.ray_init_seconds = 0.0 if self.ray_was_up else self.cluster.init_seconds  # this render's start only
        return self.out

    def progress(self) -> None:
        if self.on_progress:
            done = sum(NodeId("clip", s.shot.id) in self.out.done for s in self.plan.shots)
            self.on_progress(done, len(self.plan.shots), self.guard.spent)

    def abandon(self) -> None:
        """After a node failed: cancel what has not started and collect what is in flight, so no
        other failure is left for Ray to print. Nodes that finish are in the store for next time."""
        import ray

        refs = list(self.in_flight)
        for ref in refs:
            ray.cancel(ref)
        for ref in refs:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                pass
        self.in_flight.clear()


def execute(plan: RenderPlan, sched: Schedule, *, store: Store, prices: PriceCatalog, ffmpeg: str,
            cluster: Cluster | None = None, budget_yuan: float | None = None, margin: float = 0.25,
            on_progress: Callable[[int, int, float], None] | None = None,
            on_node: Callable[[NodeId, list[LedgerRecord]], None] | None = None) -> Execution:
    """Run the nodes ``sched`` says must run (and those held for budget, if actual costs leave
    room); return the priced ledger rows and what is now in the store. ``on_progress(shots done,
    shots, yuan spent)`` and ``on_node(node, its priced rows)`` are called on the driver as nodes
    finish (the tracker logs from them)."""
    return _Run(plan, sched, store=store, prices=prices, ffmpeg=ffmpeg, cluster=cluster or Cluster(),
                budget_yuan=budget_yuan, margin=margin, on_progress=on_progress, on_node=on_node).execute()
