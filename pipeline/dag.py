"""RenderPlan → Ray task graph → artifacts and a measured, priced ledger. The only module that imports Ray.

Per shot a chain of remote tasks linked by ObjectRefs, so Ray's own dependency resolution
schedules it::

    storyboard ─► keyframes (+ audit drawing) ─► clip (in-betweens streamed into the encoder)
    every shot's clip and panel ───────────────► assemble (concat, subtitles, timeline, sheet)

Before submitting, the driver looks each node's content key up in the artifact store: a hit
is not submitted and costs ¥0 (a cached ledger row). Every executed node returns its measured
wall seconds and the resources it held; the driver prices them. With a budget, a shot's chain
is submitted only while spent + reserved + its estimate (with a margin) stays within it; the
rest is reported with its estimate, and a later render resumes from the store.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.budget import BudgetGuard
from pipeline.cache import ArtifactStore
from pipeline.cost import PriceCatalog
from stages.records import AnimError, StageError
from pipeline.models import Ledger, LedgerRecord, RenderPlan, ShotPlan
from pipeline.nodes import CPU, Measured, assemble_node, clip_node, keyframes_node, must, sheet_node, storyboard_node
from pipeline.plan import content_key
from stages import storyboard



@dataclass
class RenderResult:
    ledger: Ledger
    outputs: dict[str, Path]  # artifact name -> file in the store
    wall_seconds: float
    ray_init_seconds: float
    stage_seconds: float = 0.0  # resource-seconds inside nodes, as the ledger bills them
    started: float = 0.0  # epoch when the graph was submitted
    spans: list[tuple[str, float, float]] = field(default_factory=list)  # (node, start, end) epochs
    cluster: dict[str, float] = field(default_factory=dict)  # resources the render held: {"CPU": 2, "GPU": 0}
    quality: dict[str, dict[str, float]] = field(default_factory=dict)  # shot -> audit metrics
    consistency: dict[str, float] = field(default_factory=dict)  # character -> colour consistency 0…1
    stopped: str | None = None  # None (complete), "storyboard", "budget" or "approval"
    remaining: list[str] = field(default_factory=list)  # shots whose clip was not rendered
    remaining_estimate_yuan: float = 0.0


def init_ray(address: str | None, num_cpus: int | None) -> float:
    """Connect to ``address`` or start a local cluster; returns the seconds it took."""
    import ray

    t0 = time.perf_counter()
    if not ray.is_initialized():
        if address:
            _check_reachable(address)
            try:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False,
                         runtime_env={"py_modules": [str(Path(__file__).parent),
                                                     str(Path(storyboard.__file__).parent)]})
            except (ConnectionError, RuntimeError) as exc:
                raise AnimError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {exc}; nothing was "
                                "rendered (unset RAY_ADDRESS to render on a local cluster)") from None
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    return time.perf_counter() - t0


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


def _get(ref: Any) -> Any:
    """``ray.get`` that surfaces a stage's own error instead of Ray's wrapped traceback.

    Nodes that finished are already in the store, so the next render resumes from them.
    """
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, AnimError):
            raise cause from None
        where = f"{getattr(exc, 'function_name', '')} {getattr(exc, 'proctitle', '')}"
        node = m.group(1) if (m := re.search(r"(\w+)_node", where)) else "render"
        raise StageError(node, None, f"{type(cause).__name__}: {cause}; finished nodes are kept in the "
                         "artifact store and will not be recomputed") from None


# Keyframe backends that hold a model: they run as a pool of Ray actors that load it once.
ACTOR_BACKENDS = {"diffusers"}


class _WorkerPool:
    """Model actors for the keyframe backend: ``actors`` replicas, each holding ``num_gpus``.

    Plates (one per location) and character sheets (one per character) are drawn first, once,
    into the store; keyframes are then drawn in batches that mix shots, so one model call
    serves several shots.
    """

    def __init__(self, cluster: "_Cluster", plan: RenderPlan, url: str):
        from pipeline.nodes import KeyframeWorker

        d = plan.profile.diffusion
        gpu = d.num_gpus if d.device != "cpu" else 0.0
        self.resource, self.units = (f"gpu:{d.gpu_type}", gpu) if gpu else (CPU, 1.0)
        self.plan, self.url, self.batch_size = plan, url, d.batch_size
        self.cluster, self.n, self.turn = cluster, d.actors, 0
        self.spec = dict(backend=plan.profile.backend, width=plan.width, height=plan.height, settings=d,
                         store=url, resource=self.resource, units=self.units)
        self.cls, self.gpus, self.actors = KeyframeWorker, gpu, []
        self.submitted: dict[str, Any] = {}  # plate/sheet key -> ref
        self.keys_of: dict[Any, str] = {}

    def start(self) -> None:
        """Create the actors and wait until each has loaded its model: a missing model, no GPU or a
        model that does not fit is reported here, before any node is submitted."""
        import ray

        self.cluster.start()
        have_gpus = float(ray.cluster_resources().get("GPU", 0.0))
        if self.gpus > have_gpus:
            raise AnimError(f"the profile asks for {self.gpus:g} GPU per {self.spec['backend']} actor and the Ray "
                            f"cluster has {have_gpus:g}; set diffusion.device = 'cpu' and num_gpus = 0 to run on "
                            "CPUs, or point RAY_ADDRESS at a cluster with GPUs; nothing was rendered")
        actor = ray.remote(num_cpus=1, num_gpus=self.gpus)(self.cls)
        self.actors = [actor.remote(**self.spec) for _ in range(self.n)]
        try:
            ray.get([a.ready.remote() for a in self.actors])
        except ray.exceptions.RayActorError as exc:
            text = str(exc)
            found = re.findall(r"(?:ProfileError|StageError|AnimError|ValueError): (.+)", text)
            problem = found[-1].strip() if found else text.strip().splitlines()[-1]
            raise AnimError(f"the {self.spec['backend']} backend could not start: {problem}; nothing was rendered")

    def _next(self) -> Any:
        if not self.actors:
            self.start()
        self.turn += 1
        return self.actors[self.turn % len(self.actors)]

    def count(self, node: str) -> int:
        return len({s.keys["plate"] for s in self.plan.shots}) if node == "plates" else len(self.plan.sheets)

    def reservation(self, ref: Any, node: str) -> tuple[str, str]:
        return (self.keys_of.get(ref, ""), node)

    @staticmethod
    def where(shot: ShotPlan) -> tuple[str, str, str]:
        """A plate's identity as the backend looks it up (``stages.diffusion.plate_key``)."""
        from stages.backgrounds import setting_of

        return (shot.location, shot.time_of_day, setting_of(shot.scene_heading, shot.location))

    def prerequisites(self, shots: list[ShotPlan], store: ArtifactStore) -> list[tuple[Any, str, str]]:
        """Submit the plates and sheets these shots need that the store does not hold yet."""
        out = []
        needed = [(s.keys["plate"], "plates", self.where(s)) for s in shots]
        needed += [(self.plan.sheets[n], "sheets", n) for s in shots for n in s.shot.characters]
        for key, node, arg in needed:
            if key in self.submitted or store.get(key) is not None:
                continue
            actor = self._next()
            ref = (actor.plate if node == "plates" else actor.sheet).remote(key, arg)
            self.submitted[key], self.keys_of[ref] = ref, key
            out.append((ref, node, key))
        return out

    def consistency(self, shots: list[ShotPlan]) -> Any:
        return self._next().consistency.remote(shots)

    def keyframes(self, shots: list[ShotPlan], after: list[Any]) -> list[tuple[ShotPlan, Any]]:
        """Batches of shots, about ``2 × batch_size`` keyframes each, round-robin over the actors."""
        out, group, count = [], [], 0
        for i, shot in enumerate(shots):
            group.append(shot)
            count += len(shot.keyframes) + (shot.audit_frame is not None)
            if count >= 2 * self.batch_size or i == len(shots) - 1:
                plates = {self.where(s): s.keys["plate"] for s in group}
                sheets = {n: self.plan.sheets[n] for s in group for n in s.shot.characters}
                deps = [self.submitted[k] for k in list(plates.values()) + list(sheets.values()) if k in self.submitted]
                refs = self._next().keyframes.options(num_returns=len(group)).remote(group, plates, sheets,
                                                                                      *deps, *after)
                out += zip(group, refs if len(group) > 1 else [refs])
                group, count = [], 0
        return out


class _Cluster:
    """Ray, started on first use: a render whose every node is a cache hit never starts it."""

    def __init__(self, address: str | None, num_cpus: int | None):
        self.address, self.num_cpus, self.init_seconds, self.started = address, num_cpus, 0.0, False

    def task(self, fn: Callable[..., Measured], num_cpus: float = 1) -> "_LazyTask":
        return _LazyTask(self, fn, num_cpus)

    def start(self) -> None:
        if not self.started:
            self.init_seconds, self.started = init_ray(self.address, self.num_cpus), True

    def wait(self, refs: list[Any]) -> tuple[list[Any], list[Any]]:
        import ray

        return ray.wait(refs, num_returns=1)

    def resources(self) -> dict[str, float]:
        """What the render held: the cluster's CPUs and GPUs, or nothing if Ray never started."""
        if not self.started:
            return {}
        import ray

        return {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}


class _LazyTask:
    def __init__(self, cluster: _Cluster, fn: Callable[..., Measured], num_cpus: float):
        self.cluster, self.fn, self.num_cpus, self.remote_fn = cluster, fn, num_cpus, None

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        if self.remote_fn is None:
            import ray

            self.cluster.start()
            self.remote_fn = ray.remote(num_cpus=self.num_cpus)(self.fn)
        return self.remote_fn.remote(*args, **kwargs)


def _chain_estimate(shot: ShotPlan) -> dict[str, float]:
    """Estimated yuan per node of a shot's chain: keyframes (+ audit drawing), clip (in-betweens + encode)."""
    est = shot.estimate_yuan
    return {"keyframes": est.get("keyframes", 0.0) + est.get("audit", 0.0),
            "clip": est.get("inbetween", 0.0) + est.get("encode", 0.0)}


def render(plan: RenderPlan, *, store: ArtifactStore, prices: PriceCatalog, ffmpeg: str,
           ray_address: str | None = None, num_cpus: int | None = None,
           on_progress: Callable[[int, int, float], None] | None = None,
           budget_yuan: float | None = None, budget_margin: float = 0.25,
           stop_after: str | None = None, approved: set[str] | None = None) -> RenderResult:
    """Run the plan; return the priced ledger and the artifacts' paths in the store.

    ``budget_yuan`` caps attributed cost (``pipeline.budget.BudgetGuard``, margin
    1 + ``budget_margin``, learning from this render's overruns).
    ``stop_after="storyboard"`` renders panels and the contact
    sheet only. ``approved`` (a set of storyboard keys) turns on the approval gate: keyframe
    money is spent only on those shots.
    """
    t_start, started = time.perf_counter(), time.time()
    p = plan.profile
    url = store.url
    cluster = _Cluster(ray_address, num_cpus)
    sb_task, kf_task, clip_task = cluster.task(storyboard_node), cluster.task(keyframes_node), cluster.task(clip_node)
    sheet_task, asm_task = cluster.task(sheet_node), cluster.task(assemble_node)

    records: list[LedgerRecord] = []
    spans: list[tuple[str, float, float]] = []
    quality: dict[str, dict[str, float]] = {}
    in_flight: dict[Any, tuple[str, str]] = {}  # ref -> (shot, node)
    stage_seconds = 0.0
    guard = BudgetGuard(budget_yuan, budget_margin)
    fits = guard.fits

    def take(measured: Measured) -> float:
        """Price a finished node into the ledger and charge it; its yuan."""
        nonlocal stage_seconds
        yuan = 0.0
        for stage, seconds in measured.timings:
            records.append(prices.record(stage, measured.shot, seconds, measured.resource, measured.units))
            stage_seconds += seconds * measured.units
            yuan += records[-1].yuan
        guard.charge(yuan)
        spans.append(("+".join(stage for stage, _ in measured.timings), *measured.span))
        if measured.quality and measured.shot:
            quality[measured.shot] = measured.quality
        return yuan

    def hit(stage: str, shot: str | None) -> None:
        records.append(prices.record(stage, shot, 0.0, CPU, 1.0, cached=True))

    looked_up: dict[str, dict[str, Path] | None] = {}

    def have(key: str) -> dict[str, Path] | None:
        """The store's answer for ``key``, verified once per render (a lookup checksums the files)."""
        if key not in looked_up:
            looked_up[key] = store.get(key)
        return looked_up[key]

    # 0. A model backend loads first: its errors (missing weights, no GPU) come before any work.
    pool = _WorkerPool(cluster, plan, url) if p.backend in ACTOR_BACKENDS else None
    if pool is not None and stop_after != "storyboard" and any(have(s.keys["clip"]) is None for s in plan.shots):
        pool.start()

    # 1. Storyboards: every shot's panel, the cheap first step and the approval gate's input.
    sb_refs: dict[str, Any] = {}
    stopped: str | None = None
    missing = [s for s in plan.shots if have(s.keys["storyboard"]) is None]
    if not fits(sum(s.estimate_yuan["storyboard"] for s in missing)):
        stopped, missing = "budget", []  # not even the storyboards fit: spend nothing
    missing_ids = {s.shot.id for s in missing}
    for shot in plan.shots:
        if shot.shot.id in missing_ids:
            sb_refs[shot.shot.id] = sb_task.remote(shot, width=p.storyboard_width, aspect=p.aspect, store=url)
        elif stopped is None:
            hit("storyboard", shot.shot.id)

    # 2. Which shots still need their chain: not cached, approved (with the gate), then by budget.
    todo: list[ShotPlan] = []
    done_shots = 0
    for shot in plan.shots:
        if have(shot.keys["clip"]) is None:
            todo.append(shot)
            continue
        for stage in ("keyframes", "inbetween", "encode") + (("audit",) if shot.audit_frame is not None else ()):
            hit(stage, shot.shot.id)
        if (q := have(shot.keys["clip"]).get("quality.json")) is not None:
            quality[shot.shot.id] = json.loads(q.read_text())
        done_shots += 1
    held_back: list[ShotPlan] = []  # shots this render will not draw
    if stopped or stop_after == "storyboard":
        stopped, held_back, todo = stopped or "storyboard", todo, []
    elif approved is not None:
        held_back = [s for s in todo if s.keys["storyboard"] not in approved]
        todo = [s for s in todo if s.keys["storyboard"] in approved]
        stopped = "approval" if held_back else None
    queue = sorted(todo, key=lambda s: -sum(s.estimate_seconds.values()))  # longest first: no idle tail

    def submit_keyframes(batch: list[ShotPlan]) -> list[tuple[ShotPlan, Any]]:
        """One CPU task per shot, or batches across shots on the model actors (plates and sheets first)."""
        if pool is None:
            return [(s, kf_task.remote(s, sb_refs.get(s.shot.id), backend=p.backend, width=plan.width,
                                       height=plan.height, store=url)) for s in batch]
        for ref, node, key in pool.prerequisites(batch, store):
            in_flight[ref] = (None, node)
            guard.reserve((key, node), plan.episode_estimate_yuan.get(node, 0.0) / max(pool.count(node), 1), learn=False)
        for s in batch:
            hit("plates", s.shot.id)  # each shot's plate comes from the store, drawn once per location
        return pool.keyframes(batch, [sb_refs[s.shot.id] for s in batch if s.shot.id in sb_refs])

    def admit() -> None:
        batch: list[ShotPlan] = []
        for shot in list(queue):
            est = _chain_estimate(shot)
            cached_kf = have(shot.keys["keyframes"]) is not None
            need = est["clip"] + (0.0 if cached_kf else est["keyframes"])
            if not fits(need):
                continue
            queue.remove(shot)
            if cached_kf:
                hit("keyframes", shot.shot.id)
                submit_clip(shot, None, est)
            else:
                guard.reserve((shot.shot.id, "keyframes"), est["keyframes"])
                guard.reserve((shot.shot.id, "clip"), est["clip"])
                batch.append(shot)
        for shot, kf_ref in submit_keyframes(batch) if batch else []:
            in_flight[kf_ref] = (shot.shot.id, "keyframes")
            submit_clip(shot, kf_ref, _chain_estimate(shot))

    def submit_clip(shot: ShotPlan, kf_ref: Any, est: dict[str, float]) -> None:
        ref = clip_task.remote(shot, kf_ref, profile=p, width=plan.width, height=plan.height, ffmpeg=ffmpeg,
                               store=url)
        in_flight[ref] = (shot.shot.id, "clip")
        guard.reserve((shot.shot.id, "clip"), est["clip"])

    # 3. Run: collect nodes as they finish, admit more as actual costs replace reservations.
    for sid, ref in sb_refs.items():
        in_flight[ref] = (sid, "storyboard")
    admit()
    if on_progress:
        on_progress(done_shots, len(plan.shots), guard.spent)
    while in_flight:
        ready, _ = cluster.wait(list(in_flight))
        sid, node = in_flight.pop(ready[0])
        guard.finish((sid, node), take(_get(ready[0])))  # the margin learns how far off estimates run
        if pool and node in ("plates", "sheets"):
            guard.release(pool.reservation(ready[0], node))
        done_shots += node == "clip"
        admit()
        if on_progress:
            on_progress(done_shots, len(plan.shots), guard.spent)
    if queue:
        stopped = "budget"
    remaining = {s.shot.id for s in held_back + queue}

    # 4. One assemble node joins every shot; a stopped render gets the storyboard sheet only.
    outputs: dict[str, Path] = {}
    if stopped is None and store.get(plan.assemble_key) is None:
        if fits(plan.assemble_estimate_yuan):
            take(_get(asm_task.remote(plan, ffmpeg=ffmpeg, store=url)))
        else:
            stopped = "budget"
    elif stopped is None:
        hit("assemble", None)
    if stopped is None:
        outputs = must(store, plan.assemble_key)
    else:
        sheet_key = content_key("sheet", storyboard.VERSION, {"title": plan.title},
                                [s.keys["storyboard"] for s in plan.shots])
        if (store.get(sheet_key) is None and all(store.get(s.keys["storyboard"]) for s in plan.shots)
                and fits(plan.shots[0].estimate_yuan["storyboard"])):
            take(_get(sheet_task.remote(plan, key=sheet_key, store=url)))
        if store.get(sheet_key) is not None:
            outputs = {"storyboard.png": must(store, sheet_key)["storyboard.png"]}

    consistency = {}
    if pool is not None and stopped is None and any(s.shot.characters for s in plan.shots):
        consistency = _get(pool.consistency([s for s in plan.shots if s.shot.characters]))
    remaining_est = sum(sum(s.estimate_yuan.values()) - s.estimate_yuan["storyboard"]
                        for s in plan.shots if s.shot.id in remaining)
    remaining_est += plan.assemble_estimate_yuan if stopped else 0.0
    return RenderResult(ledger=Ledger(records=records), outputs=outputs,
                        wall_seconds=time.perf_counter() - t_start - cluster.init_seconds,
                        ray_init_seconds=cluster.init_seconds, stage_seconds=stage_seconds,
                        started=started + cluster.init_seconds, spans=spans, cluster=cluster.resources(),
                        quality=quality, consistency=consistency, stopped=stopped,
                        remaining=[s.shot.id for s in plan.shots if s.shot.id in remaining],
                        remaining_estimate_yuan=remaining_est)


def publish(outputs: dict[str, Path], out_dir: Path, extra: dict[str, Any]) -> dict[str, Path]:
    """Copy the render's artifacts from the store into ``out_dir`` and write the JSON side files.

    Each file is copied under a temporary name and renamed, the episode last, so ``out_dir``
    never holds a half-written file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name in sorted(outputs, key=lambda n: n == "episode.mp4"):
        tmp = out_dir / f".{name}.tmp"
        shutil.copyfile(outputs[name], tmp)
        tmp.replace(out_dir / name)
        written[name] = out_dir / name
    for name, data in extra.items():
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
        tmp.replace(out_dir / name)
        written[name] = out_dir / name
    return written
