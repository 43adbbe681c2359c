"""Fit calibration rows from measured renders: each executed node's seconds against its work.

For every executed ledger row (not cached, and not ``partial``: an attempt that did not finish),
the plan says how much work the node did (units × megapixels: keyframes drawn, in-betweens made,
frames encoded …) and which calibration key prices it. A deliberate refit fits
``seconds = overhead + work × k`` per key by least squares (``fit``: overhead ≥ 0; through the
origin with fewer than 8 nodes or when the fit goes negative); this cluster's rows fit a per-unit
cost beside them (``fit_nodes``).

Two ways rows are made:

* **This cluster's rows, kept current by every render.** After each render, ``record_render``
  files its executed nodes per key in the cluster's history (``pipeline.calibration.ClusterHistory``,
  in the artifact store), each with its units and its work. ``cluster_calibration`` fits the
  nodes of the key's last ``WINDOW`` renders together (``learn``): a fixed overhead per node,
  a fixed cost per unit and a cost per unit·Mpx, every render weighing the same whatever its
  size, and a render priced more than ``OUTLIER`` times off the median render (a loaded machine)
  left out, so it cannot drag the row. Pooled, a key's nodes from draft and standard, 16:9 and 9:16 tell
  the overhead from the slope, and the pixels from the units, which one render's few nodes
  cannot (it folded the overhead into the slope). Each row carries what it missed by on the
  renders left out of its fit (``misses``) and the band they give (``learned_row``).
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
from itertools import combinations
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.calibration import Calibration, CalibrationRow, ClusterHistory, Measurements
from pipeline.fingerprint import Fingerprint, cpu_model
from pipeline.models import Ledger, RenderPlan
from pipeline.plan import calibration_keys, shot_work, stage_rows
from stages.records import Record

WINDOW = 10  # renders per key a row is learned from
MIN_NODES = 8  # fewer nodes cannot separate a fixed overhead (or a per-unit cost) from the slope
ROUNDS = 10  # at most this many rounds of leaving out outlying renders and refitting (``learn``)
OUTLIER = 1.5  # a render priced this many times off the median render is left out of the fit
COVERAGE = 0.8  # the band is meant to hold the measured total of this many renders in ten
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
        for stage, (units, mpx) in shot_work(p, s.frames, s.drawings, s.keyframes, s.still_pairs).items():
            work[(stage, s.shot.id)] = units * mpx
    return work


def units_of(plan: RenderPlan) -> dict[tuple[str, str | None], float]:
    """(stage, shot) → the units of each node's work (keyframes, in-betweens, frames; one panel,
    one mix; the assembly's shots; a shot's voice sample, its lines): its work is units ×
    megapixels (or seconds) per unit.
    A voice sample counts its lines, since the plan prices each line as a node of its own: what
    every line costs whatever its length is the per-unit cost."""
    p = plan.profile
    units: dict[tuple[str, str | None], float] = {("assemble", None): len(plan.shots), ("mix", None): 1.0,
                                                  ("subtitles", None): plan.total_frames}
    for v in plan.voices:
        units[("voice", v.line.shot)] = units.get(("voice", v.line.shot), 0.0) + 1.0
    for s in plan.shots:
        for stage, (n, _) in shot_work(p, s.frames, s.drawings, s.keyframes, s.still_pairs).items():
            units[(stage, s.shot.id)] = n
    return units


def samples(plan: RenderPlan, ledger: Ledger) -> dict[Key, list[tuple[float, float]]]:
    """(stage, backend, device, unit) → [(work, seconds)] over the executed nodes of one render."""
    return {key: [(w, s) for _, w, s in pts] for key, pts in node_samples(plan, ledger).items()}


def node_samples(plan: RenderPlan, ledger: Ledger) -> dict[Key, list[tuple[float, float, float]]]:
    """(stage, backend, device, unit) → [(units, work, seconds)] over the executed nodes of one render."""
    keys = calibration_keys(plan.profile)
    work, units = work_of(plan), units_of(plan)
    seconds: dict[tuple[str, str | None], float] = {}  # one node's rows summed (an adaptive clip bills per method)
    for r in ledger.records:  # an attempt that did not finish did only part of the node's work: not a sample
        if r.cached or r.partial or (r.stage, r.shot) not in work or r.stage not in keys:
            continue
        seconds[(r.stage, r.shot)] = seconds.get((r.stage, r.shot), 0.0) + r.seconds
    out: dict[Key, list[tuple[float, float, float]]] = defaultdict(list)
    for (stage, shot), s in seconds.items():
        backend, device, unit = keys[stage]
        out[(stage, backend, device, unit)].append((units[(stage, shot)], work[(stage, shot)], s))
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
    """Per key, the nodes (work, seconds) of every render and the runs they came from."""
    return {key: ([(w, s) for _, w, s in pts], runs) for key, (pts, runs) in _pooled_units(renders).items()}


def _pooled_units(renders: list[tuple[RenderPlan, Ledger, str]]) -> dict[Key, tuple[list[tuple[float, float, float]],
                                                                                     set[str]]]:
    """Per key, the nodes (units, work, seconds) of every render and the runs they came from."""
    pooled: dict[Key, tuple[list[tuple[float, float, float]], set[str]]] = defaultdict(lambda: ([], set()))
    for plan, ledger, run_id in renders:
        for key, pts in node_samples(plan, ledger).items():
            pooled[key][0].extend(pts)
            pooled[key][1].add(run_id)
    return pooled


# --------------------------------------------------------------------------- this cluster's rows


def render_measurements(plan: RenderPlan, ledger: Ledger, *, fingerprint: Fingerprint, run: str | None = None,
                        resources: dict[str, float] | None = None, at: float | None = None) -> list[Measurements]:
    """One render's executed nodes, one ``Measurements`` per calibration key (none if all were cached)."""
    at = time.time() if at is None else at
    return [Measurements(stage=stage, backend=backend, device=device, unit=unit, work=[w for _, w, _ in pts],
                         units=[u for u, _, _ in pts], seconds=[s for _, _, s in pts], at=at, fingerprint=fingerprint,
                         resources=resources or {}, runs=[run] if run else [], script_sha256=plan.script_sha256,
                         profile=plan.profile.name)
            for (stage, backend, device, unit), pts in sorted(node_samples(plan, ledger).items())]


def refit_measurements(renders: list[tuple[RenderPlan, Ledger, str]], *, fingerprint: Fingerprint,
                       at: float | None = None) -> list[Measurements]:
    """A deliberate refit: per key, the nodes of all ``renders`` pooled, to restart learning from."""
    at = time.time() if at is None else at
    return [Measurements(kind="refit", stage=stage, backend=backend, device=device, unit=unit,
                         work=[w for _, w, _ in pts], units=[u for u, _, _ in pts], seconds=[s for _, _, s in pts],
                         at=at, fingerprint=fingerprint, runs=sorted(runs), renders=len(runs))
            for (stage, backend, device, unit), (pts, runs) in sorted(_pooled_units(renders).items())]


def record_render(store: str, fingerprint: Fingerprint, plan: RenderPlan, ledger: Ledger, *,
                  run: str | None = None, resources: dict[str, float] | None = None) -> list[Measurements]:
    """File this render's executed nodes in the cluster's history, so the next plan learns from
    them; returns what was filed (nothing for a render whose every node was a hit)."""
    items = render_measurements(plan, ledger, fingerprint=fingerprint, run=run, resources=resources)
    ClusterHistory(store, fingerprint).add(items)
    return items


Theta = tuple[float, float, float]  # (overhead s per node, s per unit, s per unit·Mpx)


def fit_nodes(units: list[float] | None, work: list[float], seconds: list[float],
              weights: list[float] | None = None) -> Theta:
    """(overhead, per unit, per unit·Mpx), each ≥ 0, by weighted least squares.

    The slope on work comes first; the per-unit cost and then the overhead join it only with at
    least ``MIN_NODES`` nodes and where the nodes tell them apart (a column that adds no rank — every
    unit the same megapixels, or every node the same units — is left out; ``units=None`` has no
    per-unit column). Where every node did the same units (one script's assembly, rendered again),
    the nodes cannot tell a per-unit cost from a fixed one; it is taken as per unit, so it scales with
    the next script's shots rather than staying what this one's cost. Non-negative by trying each
    subset of those columns that keeps the slope on work (the work always costs: a fit that prices a
    stage by its overhead alone follows noise) and keeping the
    feasible one with the least weighted squared error; the slope alone through the origin is always
    feasible. Exact and deterministic."""
    y, w = np.asarray(seconds, float), np.sqrt(np.asarray(weights if weights is not None else [1.0] * len(seconds), float))
    columns = {2: np.asarray(work, float)}
    if len(y) >= MIN_NODES:
        if units is not None:
            columns[1] = np.asarray(units, float)
        columns[0] = np.ones(len(y))
    chosen: list[int] = []
    for i, col in columns.items():
        trial = np.column_stack([columns[j] for j in [*chosen, i]])
        norms = np.linalg.norm(trial, axis=0)
        if norms.min() > 0 and np.linalg.matrix_rank(trial / norms) == len(chosen) + 1:
            chosen.append(i)
    best: tuple[float, Theta] | None = None
    optional = [j for j in chosen if j != 2]
    for size in range(len(optional), -1, -1):
        for subset in ([2, *extra] if 2 in chosen else extra for extra in _subsets(optional, size)):
            if not subset:
                continue
            a = np.column_stack([columns[j] for j in subset]) * w[:, None]
            coef = np.linalg.lstsq(a, y * w, rcond=None)[0]
            if (coef < 0).any():
                continue
            sse = float(((a @ coef - y * w) ** 2).sum())
            theta = [0.0, 0.0, 0.0]
            for j, c in zip(subset, coef):
                theta[j] = float(c)
            if best is None or sse < best[0] - 1e-15:
                best = (sse, (theta[0], theta[1], theta[2]))
    return best[1] if best is not None else (0.0, 0.0, 0.0)


def _subsets(items: list[int], size: int) -> list[list[int]]:
    return [list(c) for c in combinations(items, size)]


def predict(theta: Theta, m: Measurements) -> float:
    """The seconds ``theta`` gives a render's nodes of a key, summed."""
    units = m.units if m.units is not None else [0.0] * len(m.work)
    return sum(theta[0] + theta[1] * u + theta[2] * w for u, w in zip(units, m.work))


def learn(history: list[Measurements]) -> Theta:
    """One key's row from the nodes of several renders, fitted together (``fit_nodes``).

    Each render weighs the same (a node's weight is 1 / its render's seconds²: relative error). A
    render the fit prices more than ``OUTLIER`` times off the median render (a render on a loaded
    machine) is left out and the rest refitted, until the renders kept settle (at most ``ROUNDS``
    rounds): it can neither drag the level nor bend the shape. Renders are not rescaled to one
    level, since a level per render would absorb what the per-unit and per-Mpx costs must tell apart
    (draft and standard renders)."""
    renders = [m for m in history if sum(m.seconds) > 0]
    if not renders:
        return 0.0, 0.0, 0.0
    with_units = all(m.units is not None for m in renders)
    kept = list(range(len(renders)))
    theta: Theta = (0.0, 0.0, 0.0)
    for _ in range(ROUNDS):
        units, work, seconds, weights = [], [], [], []
        for m in (renders[i] for i in kept):
            units += list(m.units) if with_units and m.units is not None else []
            work += list(m.work)
            seconds += list(m.seconds)
            weights += [1.0 / sum(m.seconds) ** 2] * len(m.work)
        theta = fit_nodes(units if with_units else None, work, seconds, weights)
        got = [sum(m.seconds) / p if (p := predict(theta, m)) > 0 else 1.0 for m in renders]
        level = statistics.median(got)
        keep = [i for i, g in enumerate(got) if abs(math.log(g / level)) <= math.log(OUTLIER)]
        if keep == kept:
            break
        kept = keep
    return theta


def render_id(m: Measurements) -> str:
    """The render a measurements file came from: every key of one render is filed at one time."""
    return f"{m.at:.3f}"


def misses(history: list[Measurements]) -> dict[str, float]:
    """Per render of ``history``: its measured seconds over what ``learn`` gives it from the other
    renders — without every render of its script where renders of another script exist (a
    script not used for the fit, as a plan's is), else without itself. Empty with one render."""
    renders = [m for m in history if sum(m.seconds) > 0]
    scripts = {m.script_sha256 for m in renders}
    by_script = len(scripts) > 1 and None not in scripts
    out: dict[str, float] = {}
    for m in renders:
        others = [o for o in renders if o is not m and not (by_script and o.script_sha256 == m.script_sha256)]
        if not others:
            continue
        predicted = predict(learn(others), m)
        if predicted > 0:
            out[render_id(m)] = sum(m.seconds) / predicted
    return out


def band_of(ratios: list[float], coverage: float = COVERAGE) -> float:
    """± fraction that holds ``coverage`` of renders like these: measured / estimate ratios of renders
    left out of the fit. The ⌈coverage·(n+1)⌉-th smallest |log ratio| (the largest when there are
    too few for that rank), as a factor F over and under the estimate; ± (F − 1) holds [÷F, ×F]."""
    logs = sorted(abs(math.log(r)) for r in ratios if r > 0)
    if not logs:
        return 0.0
    rank = min(math.ceil(coverage * (len(logs) + 1)), len(logs))
    return math.exp(logs[rank - 1]) - 1


def fit_residual(theta: Theta, m: Measurements) -> float:
    """A render's nodes against ``theta``, as if their errors were independent: √Σ(fit − measured)² / Σ measured."""
    units = m.units if m.units is not None else [0.0] * len(m.work)
    total = sum(m.seconds)
    return math.sqrt(sum((theta[0] + theta[1] * u + theta[2] * w - s) ** 2
                         for u, w, s in zip(units, m.work, m.seconds))) / total if total > 0 else 0.0


def learned_row(history: list[Measurements]) -> CalibrationRow:
    """This cluster's row of one key from its recent measurements (newest first): their nodes fitted
    together (``learn``), with what it missed by on the renders left out (``misses``) and the band
    they give (``band_of``); with one render, nothing was left out: the band is its fit residual."""
    newest = history[0]
    overhead, per_unit, slope = learn(history)
    missed = misses(history)
    band = band_of(list(missed.values())) if missed else fit_residual((overhead, per_unit, slope), newest)
    renders = sum(m.renders for m in history)
    runs = [r for m in history for r in m.runs]
    refit = next((m for m in history if m.kind == "refit"), None)
    scripts = len({m.script_sha256 for m in history})
    how = (f"±{band:.1%} holds {COVERAGE:.0%} of {len(missed)} render(s) left out of the fit "
           f"({'each without its script' if scripts > 1 else 'one script: each without itself'})" if missed
           else f"±{band:.1%} from its fit residuals only: fewer than 2 renders, none left out yet")
    return CalibrationRow(
        stage=newest.stage, backend=newest.backend, device=newest.device, unit=newest.unit, overhead_s=overhead,
        seconds_per_unit=per_unit, seconds_per_unit_mpx=slope, band=band, misses=missed, renders=len(history),
        measured_at=datetime.fromtimestamp(newest.at, timezone.utc).strftime("%Y-%m-%d"),
        source=f"this cluster ({newest.fingerprint.label}): {len(history)} render(s) fitted together, "
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
    """Which rows priced a plan and how far off the estimate may be, from what this cluster's rows
    missed by on renders left out of their fits.

    Per such render, its stages' misses (``CalibrationRow.misses``) weighted by this plan's ¥ per
    stage give what the plan's estimate would have missed by there; the band holds ``COVERAGE``
    of those renders (``band_of``). Rows with no render left out yet (one render) add their fit
    residuals instead: ± Σ stage ¥ × its row's band.
    """

    cluster: str | None = None  # the cluster's label
    location: str | None = None  # where its measurements are kept
    tables: list[str] = []  # the tables under its rows, lowest first
    stages: dict[str, str] = {}  # estimate stage -> "cluster" | "table"
    cluster_yuan: float = 0.0  # estimated by this cluster's rows
    table_yuan: float = 0.0  # estimated by table rows (shipped or user): no band
    plus_minus_yuan: float = 0.0  # ± on cluster_yuan
    renders: int = 0  # fewest renders behind a cluster row used; 0 when none
    held_out: int = 0  # renders left out of the fits whose misses make the band; 0: fit residuals only
    coverage: float = COVERAGE  # what share of such renders the band is meant to hold

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
                "plus_minus_yuan": self.plus_minus_yuan, "renders": self.renders, "held_out": self.held_out,
                "coverage": self.coverage if self.held_out else None}

    def line(self) -> str:
        """One line for ``anim plan``: which rows priced the estimate, and its band."""
        used = set(self.stages.values())
        tables = " < ".join(self.tables) or "an in-memory table"
        if "cluster" not in used:
            who = f"; this cluster ({self.cluster}) has no rows for them yet" if self.cluster else ""
            return f"calibration: table rows ({tables}){who}: no ± band until it renders"
        band = f"±{self.band:.1%} (±¥{self.plus_minus_yuan:.5f})"
        few = ("from 1 render fit: no spread across renders yet" if not self.held_out else
               f"meant to hold {self.coverage:.0%} of renders: what the rows missed by on {self.held_out} "
               "render(s) left out of their fits")
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
    used: dict[str, tuple[float, CalibrationRow]] = {}
    for stage, yuan in by_stage.items():
        row = rows[PRICED_BY.get(stage, stage)]
        if row.renders:
            stages[stage] = "cluster"
            cluster_yuan += yuan
            pm += yuan * (row.band or 0.0)
            renders.append(row.renders)
            used[stage] = (yuan, row)
        else:
            stages[stage] = "table"
            table_yuan += yuan
    totals = plan_misses(used)
    if totals:
        pm = cluster_yuan * band_of(totals)
    return EstimateBand(cluster=calibration.cluster, location=calibration.cluster_location,
                        tables=[p for p in calibration.paths if Path(p).exists()], stages=stages, cluster_yuan=cluster_yuan,
                        table_yuan=table_yuan, plus_minus_yuan=pm, renders=min(renders, default=0),
                        held_out=len(totals))


def plan_misses(used: dict[str, tuple[float, CalibrationRow]]) -> list[float]:
    """Per render left out of the rows' fits, what an estimate with these stages' ¥ (``used``: stage →
    (¥, its row)) would have missed by there: Σ ¥ × the row's miss / Σ ¥ over the stages that
    render measured — a render whose measured stages carry under half the ¥ is not counted."""
    total = sum(y for y, _ in used.values())
    ids = sorted({i for _, row in used.values() for i in row.misses})
    out = []
    for i in ids:
        have = [(y, row.misses[i]) for y, row in used.values() if i in row.misses]
        weight = sum(y for y, _ in have)
        if total > 0 and weight >= 0.5 * total:
            out.append(sum(y * r for y, r in have) / weight)
    return out
