"""Fit calibration rows from measured renders: each executed node's seconds against its work.

For every executed (not cached) ledger row, the plan says how much work the node did
(units × megapixels: keyframes drawn, in-betweens made, frames encoded …) and which
calibration key prices it. Per key, ``seconds = overhead + work × k`` is fitted by least
squares (overhead ≥ 0; through the origin with fewer than 8 nodes or when the fit goes negative).
``anim calibrate`` feeds it the runs recorded in MLflow; ``experiments/calibrate_cpu.py``
feeds it fresh renders.
"""
from __future__ import annotations

import platform
from collections import defaultdict
from datetime import date
from pathlib import Path

import numpy as np

from pipeline.calibration import CalibrationRow
from pipeline.models import Ledger, RenderPlan
from pipeline.plan import calibration_keys, shot_work


def work_of(plan: RenderPlan) -> dict[tuple[str, str | None], float]:
    """(stage, shot) → units × megapixels the node did, for the stages that have a calibration row
    (the same work ``pipeline.plan`` scales each row by)."""
    p = plan.profile
    work: dict[tuple[str, str | None], float] = {("assemble", None): plan.total_frames * plan.width * plan.height / 1e6}
    for s in plan.shots:
        for stage, (units, mpx) in shot_work(p, s.frames, s.drawings, s.keyframes).items():
            work[(stage, s.shot.id)] = units * mpx
    return work


def samples(plan: RenderPlan, ledger: Ledger) -> dict[tuple[str, str, str, str], list[tuple[float, float]]]:
    """(stage, backend, device, unit) → [(work, seconds)] over the executed nodes of one render."""
    keys = calibration_keys(plan.profile)
    work = work_of(plan)
    out: dict[tuple[str, str, str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in ledger.records:
        if r.cached or (r.stage, r.shot) not in work or r.stage not in keys:
            continue
        backend, device, unit = keys[r.stage]
        out[(r.stage, backend, device, unit)].append((work[(r.stage, r.shot)], r.seconds))
    return out


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(overhead seconds ≥ 0, seconds per unit·Mpx ≥ 0)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(x) >= 8 and np.ptp(x) > 0:  # fewer nodes cannot separate a fixed overhead from the slope
        slope, intercept = np.polyfit(x, y, 1)
        if intercept >= 0 and slope >= 0:
            return float(intercept), float(slope)
    return 0.0, max(float((x @ y) / (x @ x)) if (x @ x) > 0 else 0.0, 0.0)


def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def fit_rows(renders: list[tuple[RenderPlan, Ledger, str]], *, origin: str) -> list[CalibrationRow]:
    """Rows fitted over ``renders`` — (plan, ledger, run id) — named with where they were measured."""
    pooled: dict[tuple[str, str, str, str], list[tuple[float, float]]] = defaultdict(list)
    runs: dict[tuple[str, str, str, str], set[str]] = defaultdict(set)
    for plan, ledger, run_id in renders:
        for key, pts in samples(plan, ledger).items():
            pooled[key] += pts
            runs[key].add(run_id)
    rows = []
    for (stage, backend, device, unit), pts in sorted(pooled.items()):
        overhead, slope = fit([w for w, _ in pts], [s for _, s in pts])
        ids = ", ".join(sorted(runs[(stage, backend, device, unit)])[:4])
        rows.append(CalibrationRow(
            stage=stage, backend=backend, device=device, unit=unit, overhead_s=round(overhead, 5),
            seconds_per_unit_mpx=round(slope, 6), measured_at=str(date.today()),
            source=f"measured here: {origin} on {machine()}, {len(pts)} nodes, MLflow run(s) {ids}"))
    return rows
