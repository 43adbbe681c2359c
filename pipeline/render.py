"""One render: plan → schedule (pure) → execution (Ray) → result (what was delivered, what it
cost, what remains). The CLI, the experiments and the tests render through ``render``.

Spend is counted twice, and both are on the result: what *this* render paid (``ledger``,
including the partial time of nodes the budget cap cancelled) and what the *episode* has cost
so far across every render of it (``episode_spent_yuan``: every spend note of every node of
the plan in the store, ``pipeline.ledger``) — so a render that was killed before it published
anything still counts, and a rerun that finds everything in the store shows ¥0 for itself and
the episode's full cost beside it.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from pipeline import dag
from pipeline.cost import BilledView, PriceCatalog, billed_view
from pipeline.ledger import LEASE_S, Work, episode_ledger
from pipeline.models import Bed, Ledger, LedgerRecord, Profile, RenderPlan
from pipeline.schedule import NodeId, Schedule, schedule, voice_schedule
from pipeline.store import Store
from stages.records import Episode, ProfileError, Speech

Scope = Literal["episode", "render"]


@dataclass
class RenderResult:
    ledger: Ledger  # what this render paid
    outputs: dict[str, Path]  # artifact name -> file in the store
    schedule: Schedule
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
    render_id: str = ""  # the holder of this render's leases and spend notes
    spent_before_yuan: float = 0.0  # the episode's spend on record when this render started
    episode_spent_yuan: float = 0.0  # the episode's spend on record now, across every render of it
    budget_yuan: float | None = None
    budget_scope: Scope = "episode"
    cancelled: list[str] = field(default_factory=list)  # nodes the cap stopped in flight (billed in ledger)
    cancelled_yuan: float = 0.0
    cap_reached: bool = False  # the cap stopped running nodes
    budget_note: str | None = None  # what the budget left undone and why
    startups: list[LedgerRecord] = field(default_factory=list)  # model_load / warmup rows: billed, not in ledger
    billed: BilledView | None = None  # itemised billed view (load, warm-up, busy, idle, cluster start)

    @property
    def spent_yuan(self) -> float:
        """What this render paid (its ledger's total)."""
        return self.ledger.total_yuan

    @property
    def budget_spent_yuan(self) -> float:
        """What counts against the budget: the episode so far, or this render alone."""
        return self.spent_before_yuan + self.spent_yuan if self.budget_scope == "episode" else self.spent_yuan


def stored_speech(plan: RenderPlan, store: Store) -> dict[str, Speech]:
    """The measured speech of every line whose voice node is in the store, by content key: what
    ``make_plan(speech=…)`` times the cut by."""
    out: dict[str, Speech] = {}
    for v in plan.voices:
        files = store.get(v.key)
        if files is not None and "speech.json" in files:
            out[v.key] = Speech.model_validate_json(files["speech.json"].read_text())
    return out


def music_bed(episode: Episode, profile: Profile) -> Bed | None:
    """The music or ambience file under the dialogue — the profile's ``music``, else the script's
    title page ``Music:`` (relative to the script) — with its content's sha256, or None."""
    import hashlib

    named = profile.music or episode.title_page.get("music") or episode.title_page.get("Music")
    if not named:
        return None
    path = Path(named).expanduser()
    if not path.is_absolute() and not profile.music:
        path = Path(episode.source).parent / path
    if not path.is_file():
        where = "profile field music" if profile.music else f"{episode.source}: title page Music"
        raise ProfileError(f"{where}: {named!r}: no such file ({path}); nothing was rendered")
    return Bed(path=str(path.resolve()), sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def speak(plan: RenderPlan, *, store: Store, prices: PriceCatalog, ffmpeg: str, cluster: dag.Cluster,
          work: Work | None = None, budget_yuan: float | None = None, spent_yuan: float = 0.0) -> dag.Execution:
    """Run the plan's voice nodes (those not in the store): a render speaks first, then plans its
    frames with the measured times (``stored_speech``). Billed like every node, under the render's
    cap (``budget_yuan``, with ``spent_yuan`` already spent: the voices are not spoken when they do
    not fit); pass the result to ``render(spoken=…)`` so this render's ledger carries it."""
    work = work or Work(store=store.url, holder=uuid.uuid4().hex[:12], prices=prices)
    t0 = time.perf_counter()
    spoken = dag.execute(plan, voice_schedule(plan, store), store=store, prices=prices, ffmpeg=ffmpeg,
                         cluster=cluster, work=work, budget_yuan=budget_yuan, spent_yuan=spent_yuan)
    spoken.wall_seconds = time.perf_counter() - t0
    return spoken


def render(plan: RenderPlan, *, store: Store, prices: PriceCatalog, ffmpeg: str,
           cluster: dag.Cluster | None = None, approvals: set[str] | None = None, stop_after: str | None = None,
           budget_yuan: float | None = None, budget_margin: float = 0.25, budget_scope: Scope = "episode",
           on_progress: Callable[[int, int, float], None] | None = None,
           on_node: Callable[[NodeId, list[LedgerRecord]], None] | None = None,
           lease_s: float = LEASE_S, spoken: dag.Execution | None = None) -> RenderResult:
    """Render what the store does not hold yet; return the priced ledger and the artifacts' paths.

    ``approvals`` (approved storyboard keys) turns on the approval gate; ``stop_after="storyboard"``
    renders panels and the contact sheet only; ``budget_yuan`` caps spend (``pipeline.dag``:
    at most the budget plus what nodes already running cost while they are stopped) — of the
    episode across renders (``budget_scope="episode"``, the default: what earlier renders spent
    counts) or of this render alone (``"render"``); ``budget_margin``: the starting margin on
    estimates. ``lease_s``: how long this render's leases outlive its last heartbeat.
    ``spoken``: the voice nodes this render ran first (``speak``): their rows join its ledger.
    """
    if budget_scope not in ("episode", "render"):
        raise ValueError(f"budget_scope={budget_scope!r}: 'episode' or 'render'")
    t_start, started = time.perf_counter(), time.time()
    # 1. What the episode has spent so far, and how far from the rows its nodes ran on this cluster.
    before = episode_ledger(plan, store)
    voiced = sum(r.yuan for r in spoken.records if not r.cached) if spoken is not None else 0.0  # paid just now
    spent = before.total_yuan if budget_scope == "episode" else voiced
    sched = schedule(plan, store, approvals=approvals, stop_after=stop_after, budget_yuan=budget_yuan,
                     margin=budget_margin, spent_yuan=spent)
    # 2. Execute under this render's id (its leases and spend notes).
    work = Work(store=store.url, holder=uuid.uuid4().hex[:12], prices=prices, lease_s=lease_s)
    ran = dag.execute(plan, sched, store=store, prices=prices, ffmpeg=ffmpeg, cluster=cluster or dag.Cluster(),
                      budget_yuan=budget_yuan, margin=budget_margin, spent_yuan=spent,
                      history=before.history(sched, prices), work=work, on_progress=on_progress, on_node=on_node)
    if spoken is not None:  # the voices spoken first: this render's work too
        # its rows (spoken and cached) stand for the voice nodes, which this execution found as hits
        ran.records[:] = spoken.records + [r for r in ran.records if r.stage != "voice"]
        ran.spans[:0] = spoken.spans
        ran.stage_seconds += spoken.stage_seconds
        ran.ray_init_seconds += spoken.ray_init_seconds
        t_start, started = t_start - spoken.wall_seconds, started - spoken.wall_seconds  # the render began there
    result = _result(plan, sched, ran, store, wall=time.perf_counter() - t_start, started=started)
    # 3. The episode's spend now, as the store records it.
    result.render_id, result.spent_before_yuan = work.holder, before.total_yuan - voiced
    result.episode_spent_yuan = episode_ledger(plan, store).total_yuan
    result.budget_yuan, result.budget_scope = budget_yuan, budget_scope
    # 4. What a cloud bills for it: the cluster's machines, itemised, with the attributed beside it.
    gpu_types = [r.gpu_type for r in map(plan.profile.resources, ("storyboard", "keyframes", "inbetween")) if r.gpus]
    result.billed = billed_view(prices, records=result.ledger.records, startups=result.startups,
                                wall_seconds=result.wall_seconds, ray_init_seconds=result.ray_init_seconds,
                                cluster=result.cluster, gpu_type=gpu_types[0] if gpu_types else None)
    return result


def _result(plan: RenderPlan, sched: Schedule, ran: dag.Execution, store: Store, *, wall: float,
            started: float) -> RenderResult:
    """What the render delivered: the episode or the storyboard sheet, the quality of every clip
    (measured now or stored with a cached clip), and what remains with its estimate."""
    outputs: dict[str, Path] = {}
    if ran.finish == NodeId("assemble"):
        outputs = dict(store.get(plan.assemble_key) or {})
    elif ran.finish == NodeId("contact_sheet"):
        outputs = {"storyboard.png": (store.get(plan.contact_sheet_key) or {})["storyboard.png"]}
    quality = dict(ran.quality)
    for shot in plan.shots:
        if shot.shot.id not in quality and NodeId("clip", shot.shot.id) in ran.done:
            files = store.get(shot.keys["clip"]) or {}
            if "quality.json" in files:
                quality[shot.shot.id] = json.loads(files["quality.json"].read_text())
    remaining = [s.shot.id for s in plan.shots if NodeId("clip", s.shot.id) not in ran.done]
    stopped = None if ran.finish == NodeId("assemble") else (sched.stopped or "budget")
    remaining_est = sum(sum(s.estimate_yuan.values()) - s.estimate_yuan["storyboard"]
                        for s in plan.shots if s.shot.id in remaining)
    remaining_est += plan.assemble_estimate_yuan if stopped else 0.0
    return RenderResult(
        ledger=Ledger(records=ran.records), outputs=outputs, schedule=sched,
        wall_seconds=wall - ran.ray_init_seconds, ray_init_seconds=ran.ray_init_seconds,
        stage_seconds=ran.stage_seconds, started=started + ran.ray_init_seconds, spans=ran.spans,
        cluster=ran.cluster, quality=quality, consistency=ran.consistency, stopped=stopped,
        remaining=remaining, remaining_estimate_yuan=remaining_est, cancelled=[str(n) for n in ran.cancelled],
        cancelled_yuan=ran.cancelled_yuan, cap_reached=ran.cap_reached, budget_note=ran.budget_note,
        startups=list(ran.startups))
