"""One render: plan → schedule (pure) → execution (Ray) → result (what was delivered, what it
cost, what remains). The CLI, the experiments and the tests render through ``render``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline import dag
from pipeline.cost import PriceCatalog
from pipeline.models import Ledger, LedgerRecord, RenderPlan
from pipeline.schedule import NodeId, Schedule, schedule
from pipeline.store import Store


@dataclass
class RenderResult:
    ledger: Ledger
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


def render(plan: RenderPlan, *, store: Store, prices: PriceCatalog, ffmpeg: str,
           cluster: dag.Cluster | None = None, approvals: set[str] | None = None, stop_after: str | None = None,
           budget_yuan: float | None = None, budget_margin: float = 0.25,
           on_progress: Callable[[int, int, float], None] | None = None,
           on_node: Callable[[NodeId, list[LedgerRecord]], None] | None = None) -> RenderResult:
    """Render what the store does not hold yet; return the priced ledger and the artifacts' paths.

    ``approvals`` (approved storyboard keys) turns on the approval gate; ``stop_after="storyboard"``
    renders panels and the contact sheet only; ``budget_yuan`` caps attributed cost
    (``pipeline.budget.BudgetGuard``, margin 1 + ``budget_margin``).
    """
    t_start, started = time.perf_counter(), time.time()
    sched = schedule(plan, store, approvals=approvals, stop_after=stop_after, budget_yuan=budget_yuan,
                     margin=budget_margin)
    cluster = cluster or dag.Cluster()
    ran = dag.execute(plan, sched, store=store, prices=prices, ffmpeg=ffmpeg, cluster=cluster,
                      budget_yuan=budget_yuan, margin=budget_margin, on_progress=on_progress, on_node=on_node)
    return _result(plan, sched, ran, store, wall=time.perf_counter() - t_start, started=started)


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
        remaining=remaining, remaining_estimate_yuan=remaining_est)
