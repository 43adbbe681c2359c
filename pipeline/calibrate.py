"""Fit calibration rows from measured renders: each executed node's seconds against its work.

For every executed (not cached) ledger row, the plan says how much work the node did
(units × megapixels: keyframes drawn, in-betweens made, frames encoded …) and which
calibration key prices it. Per key, ``seconds = overhead + work × k`` is fitted by least
squares (overhead ≥ 0; through the origin with fewer than 8 nodes or when the fit goes negative).

Two ways rows are made:

* **This cluster's rows, kept current by every render.** After each render, ``record_render``
  files its executed nodes per key in the cluster's history (``pipeline.calibration.ClusterHistory``,
  in the artifact store). ``cluster_calibration`` fits each of the key's last ``WINDOW``
  renders on its own and takes the **median** overhead and the median slope: one render on a
  loaded machine cannot drag the row. Each row carries a band (``learned_row``).
* **A deliberate refit** (``anim calibrate``, ``experiments/calibrate_cpu.py``): ``fit_rows``
  pools the nodes of chosen renders into one fit per key, written to a table; ``anim calibrate``
  also files the pooled nodes as a refit in this cluster's history, so learning starts again
  from them.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.calibration import Calibration, CalibrationRow, ClusterHistory, Measurements
from pipeline.fingerprint import Fingerprint, cpu_model
from pipeline.models import Ledger, RenderPlan
from pipeline.plan import calibration_keys, shot_work, stage_rows
from stages.records import Record

WINDOW = 10  # renders per key whose fits the median is taken over
# Estimate stages the plan prices with another stage's row (pipeline.plan: the audit drawing,
# background plates and character sheets are drawn by the keyframe backend).
PRICED_BY = {"audit": "keyframes", "plates": "keyframes", "sheets": "keyframes"}

Key = tuple[str, str, str, str]


def work_of(plan: RenderPlan) -> dict[tuple[str, str | None], float]:
    """(stage, shot) → units × megapixels the node did, for the stages that have a calibration row
    (the same work ``pipeline.plan`` scales each row by)."""
    p = plan.profile
    work: dict[tuple[str, str | None], float] = {("assemble", None): plan.total_frames * plan.width * plan.height / 1e6,
                                                 ("mix", None): plan.duration_s,
                                                 ("subtitles", None): plan.total_frames * plan.width * plan.height / 1e6}
    for v in plan.voices:  # a shot's lines, by the seconds they speak
        work[("voice", v.line.shot)] = work.get(("voice", v.line.shot), 0.0) + v.spoken_s
    for s in plan.shots:
        for stage, (units, mpx) in shot_work(p, s.frames, s.drawings, s.keyframes).items():
            work[(stage, s.shot.id)] = units * mpx
    return work


def samples(plan: RenderPlan, ledger: Ledger) -> dict[Key, list[tuple[float, float]]]:
    """(stage, backend, device, unit) → [(work, seconds)] over the executed nodes of one render."""
    keys = calibration_keys(plan.profile)
    work = work_of(plan)
    seconds: dict[tuple[str, str | None], float] = {}  # one node's rows summed (an adaptive clip bills per method)
    for r in ledger.records:
        if r.cached or (r.stage, r.shot) not in work or r.stage not in keys:
            continue
        seconds[(r.stage, r.shot)] = seconds.get((r.stage, r.shot), 0.0) + r.seconds
    out: dict[Key, list[tuple[float, float]]] = defaultdict(list)
    for (stage, shot), s in seconds.items():
        backend, device, unit = keys[stage]
        out[(stage, backend, device, unit)].append((work[(stage, shot)], s))
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
    return cpu_model()


def fit_rows(renders: list[tuple[RenderPlan, Ledger, str]], *, origin: str) -> list[CalibrationRow]:
    """Rows fitted over ``renders`` — (plan, ledger, run id) — named with where they were measured."""
    rows = []
    for (stage, backend, device, unit), (pts, runs) in sorted(_pooled(renders).items()):
        overhead, slope = fit([w for w, _ in pts], [s for _, s in pts])
        ids = ", ".join(sorted(runs)[:4])
        rows.append(CalibrationRow(
            stage=stage, backend=backend, device=device, unit=unit, overhead_s=round(overhead, 5),
            seconds_per_unit_mpx=round(slope, 6), measured_at=str(date.today()),
            source=f"measured here: {origin} on {machine()}, {len(pts)} nodes, MLflow run(s) {ids}"))
    return rows


def _pooled(renders: list[tuple[RenderPlan, Ledger, str]]) -> dict[Key, tuple[list[tuple[float, float]], set[str]]]:
    """Per key, the nodes of every render and the runs they came from."""
    pooled: dict[Key, tuple[list[tuple[float, float]], set[str]]] = defaultdict(lambda: ([], set()))
    for plan, ledger, run_id in renders:
        for key, pts in samples(plan, ledger).items():
            pooled[key][0].extend(pts)
            pooled[key][1].add(run_id)
    return pooled


# --------------------------------------------------------------------------- this cluster's rows


def render_measurements(plan: RenderPlan, ledger: Ledger, *, fingerprint: Fingerprint, run: str | None = None,
                        resources: dict[str, float] | None = None, at: float | None = None) -> list[Measurements]:
    """One render's executed nodes, one ``Measurements`` per calibration key (none if all were cached)."""
    at = time.time() if at is None else at
    return [Measurements(stage=stage, backend=backend, device=device, unit=unit, work=[w for w, _ in pts],
                         seconds=[s for _, s in pts], at=at, fingerprint=fingerprint, resources=resources or {},
                         runs=[run] if run else [], script_sha256=plan.script_sha256, profile=plan.profile.name)
            for (stage, backend, device, unit), pts in sorted(samples(plan, ledger).items())]


def refit_measurements(renders: list[tuple[RenderPlan, Ledger, str]], *, fingerprint: Fingerprint,
                       at: float | None = None) -> list[Measurements]:
    """A deliberate refit: per key, the nodes of all ``renders`` pooled, to restart learning from."""
    at = time.time() if at is None else at
    return [Measurements(kind="refit", stage=stage, backend=backend, device=device, unit=unit,
                         work=[w for w, _ in pts], seconds=[s for _, s in pts], at=at, fingerprint=fingerprint,
                         runs=sorted(runs), renders=len(runs))
            for (stage, backend, device, unit), (pts, runs) in sorted(_pooled(renders).items())]


def record_render(store: str, fingerprint: Fingerprint, plan: RenderPlan, ledger: Ledger, *,
                  run: str | None = None, resources: dict[str, float] | None = None) -> list[Measurements]:
    """File this render's executed nodes in the cluster's history, so the next plan learns from
    them; returns what was filed (nothing for a render whose every node was a hit)."""
    items = render_measurements(plan, ledger, fingerprint=fingerprint, run=run, resources=resources)
    ClusterHistory(store, fingerprint).add(items)
    return items


def band_parts(overhead: float, slope: float, history: list[Measurements]) -> tuple[float, float | None]:
    """(residual, across) of a row learned from ``history``, as fractions of the measured seconds.

    * ``residual``: per render, its own fit's residuals on the render's total, as if the nodes'
      errors were independent (√Σ(fit − measured)² / Σ measured); the median over the renders.
    * ``across``: per render, how far the learned row prices its nodes from what they measured
      (|Σ row / Σ measured − 1|); the median over the renders — the spread from one render to
      the next (the machine's load, the scripts' content). None with fewer than 2 renders.
    """
    residual, across = [], []
    for m in history:
        total = sum(m.seconds)
        if total <= 0:
            continue
        o, k = fit(m.work, m.seconds)
        residual.append(math.sqrt(sum((o + k * w - s) ** 2 for w, s in zip(m.work, m.seconds))) / total)
        across.append(abs(sum(overhead + slope * w for w in m.work) / total - 1))
    return (statistics.median(residual) if residual else 0.0,
            statistics.median(across) if len(across) >= 2 else None)


def learned_row(history: list[Measurements]) -> CalibrationRow:
    """This cluster's row of one key from its recent measurements (newest first): the median of the
    per-render fits' overheads and of their slopes, with a band of ± the larger of the fit
    residual and the spread across renders (``band_parts``)."""
    newest = history[0]
    fits = [fit(m.work, m.seconds) for m in history]
    overhead, slope = statistics.median(o for o, _ in fits), statistics.median(k for _, k in fits)
    residual, across = band_parts(overhead, slope, history)
    band = max(residual, across or 0.0)
    renders = sum(m.renders for m in history)
    runs = [r for m in history for r in m.runs]
    refit = next((m for m in history if m.kind == "refit"), None)
    how = (f"±{band:.1%} (fit residuals {residual:.1%}, spread across renders {across:.1%})" if across is not None
           else f"±{band:.1%} from its fit residuals only: fewer than 2 renders, no spread across renders yet")
    return CalibrationRow(
        stage=newest.stage, backend=newest.backend, device=newest.device, unit=newest.unit, overhead_s=overhead,
        seconds_per_unit_mpx=slope, band=band, renders=len(history),
        measured_at=datetime.fromtimestamp(newest.at, timezone.utc).strftime("%Y-%m-%d"),
        source=f"this cluster ({newest.fingerprint.label}): median of {len(history)} render fit(s), "
               f"{sum(len(m.work) for m in history)} nodes{f' ({renders} renders, a refit among them)' if refit else ''}"
               f", {how}; MLflow run(s) {', '.join(runs[:4]) or 'none recorded'}")


def cluster_calibration(base: Calibration, store: str, fingerprint: Fingerprint, *,
                        window: int = WINDOW) -> Calibration:
    """``base`` (the shipped and user tables) with this cluster's learned rows on top, where it has any."""
    history = ClusterHistory(store, fingerprint)
    recent, ignored = history.recent(window)
    rows = [learned_row(ms) for _, ms in sorted(recent.items())]
    return base.overlay(rows, cluster=fingerprint.label, location=history.location, ignored=ignored)


# --------------------------------------------------------------------------- the band on a plan


class EstimateBand(Record):
    """Which rows priced a plan and how far off the estimate may be, traced to the rows' bands.

    The stages' bands add up (an estimate is as far off on every stage at once when the machine
    is loaded, so no cancelling is assumed): ± Σ stage ¥ × its row's band.
    """

    cluster: str | None = None  # the cluster's label
    location: str | None = None  # where its measurements are kept
    tables: list[str] = []  # the tables under its rows, lowest first
    stages: dict[str, str] = {}  # estimate stage -> "cluster" | "table"
    cluster_yuan: float = 0.0  # estimated by this cluster's rows
    table_yuan: float = 0.0  # estimated by table rows (shipped or user): no band
    plus_minus_yuan: float = 0.0  # ± on cluster_yuan
    renders: int = 0  # fewest renders behind a cluster row used; 0 when none

    @property
    def band(self) -> float | None:
        """± fraction of the part of the estimate priced by this cluster's rows."""
        return self.plus_minus_yuan / self.cluster_yuan if self.cluster_yuan > 0 else None

    def summary(self) -> dict:
        """The ``calibration`` member of ``anim plan --json``."""
        return {"rows": "cluster" if not self.table_yuan and self.cluster_yuan else
                "table" if not self.cluster_yuan else "mixed", "cluster": self.cluster, "location": self.location,
                "tables": self.tables, "stages": self.stages,
                "cluster_yuan": self.cluster_yuan, "table_yuan": self.table_yuan, "band": self.band,
                "plus_minus_yuan": self.plus_minus_yuan, "renders": self.renders}

    def line(self) -> str:
        """One line for ``anim plan``: which rows priced the estimate, and its band."""
        used = set(self.stages.values())
        tables = " < ".join(self.tables) or "an in-memory table"
        if "cluster" not in used:
            who = f"; this cluster ({self.cluster}) has no rows for them yet" if self.cluster else ""
            return f"calibration: table rows ({tables}){who}: no ± band until it renders"
        band = f"±{self.band:.1%} (±¥{self.plus_minus_yuan:.5f})"
        few = ("from 1 render fit: no spread across renders yet" if self.renders < 2 else
               f"over ≥ {self.renders} render fits (spread across renders and fit residuals)")
        if used == {"cluster"}:
            return f"calibration: this cluster's rows ({self.cluster}) for every stage: {band}, {few}"
        cluster = ", ".join(s for s, v in self.stages.items() if v == "cluster")
        table = ", ".join(s for s, v in self.stages.items() if v == "table")
        return (f"calibration: this cluster's rows ({self.cluster}) for {cluster}: {band} on their "
                f"¥{self.cluster_yuan:.5f}, {few}; table rows ({tables}) for {table}: ¥{self.table_yuan:.5f}, "
                "no band")


def estimate_band(plan: RenderPlan, calibration: Calibration) -> EstimateBand:
    """The rows behind each estimated stage of ``plan`` and the band they give its total."""
    rows = stage_rows(plan.profile, calibration)
    by_stage = plan.estimate_by_stage()
    stages, cluster_yuan, table_yuan, pm, renders = {}, 0.0, 0.0, 0.0, []
    for stage, yuan in by_stage.items():
        row = rows[PRICED_BY.get(stage, stage)]
        if row.renders:
            stages[stage] = "cluster"
            cluster_yuan += yuan
            pm += yuan * (row.band or 0.0)
            renders.append(row.renders)
        else:
            stages[stage] = "table"
            table_yuan += yuan
    return EstimateBand(cluster=calibration.cluster, location=calibration.cluster_location,
                        tables=[p for p in calibration.paths if Path(p).exists()], stages=stages, cluster_yuan=cluster_yuan,
                        table_yuan=table_yuan, plus_minus_yuan=pm, renders=min(renders, default=0))
