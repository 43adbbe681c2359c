"""Benchmark: estimate error on scripts not used for fitting — the shipped rows, this cluster's
rows as they were learned before (per-render fits, their median) and as they are learned now
(``pipeline.calibrate``: every render's nodes fitted together), side by side, with each one's band.

    .venv/bin/python experiments/estimate_error.py [--fit examples/episode_en.fountain]
        [--fit-repeats 3] [--held-out SCRIPT ...] [--profile draft --profile standard]
        [--aspect 16:9 --aspect 9:16] [--fit-aspect 16:9 ...] [--save DIR | --load DIR] [--no-mlflow]

In one run, on one local Ray cluster, every render into an empty store (every node runs):

1. a warm-up render (not measured), so the first fitted render does not pay the workers' start-up;
2. the **fit** script ``--fit-repeats`` times at every profile and fit aspect (``--fit-aspect``,
   by default every ``--aspect``): what this cluster learns from, each render's nodes filed as
   ``anim render`` files them (``pipeline.calibrate.render_measurements``);
3. every **held-out** script (none of them the fit script) once at every profile and aspect;
4. as a control, the fit script once more at every profile, 16:9: its ratio is the machine's
   drift since the fit renders (load comes and goes on a shared machine).

Then every held-out render is estimated three ways from the same fit renders — **shipped** (the
table a cluster that never rendered prices from), **before** (the previous learning: each render
fitted on its own, through the origin below 8 nodes, the median of those fits; band: the larger
of the fit residuals and the spread across renders) and **after** (``cluster_calibration`` now:
pooled fit of overhead, per-unit and per-unit·Mpx cost, a render 1.5× off the median left out; band:
what the rows missed by on fit renders left out, meant to hold ``COVERAGE`` of renders) — and
each estimate / measured ratio is printed per stage and in total (1.00 = exact, 0.74 = 26%
short), with whether the measured total lies inside each band. The summary gives each case's
ratios, their geometric mean, the worst case, how many are within 25%, and each band's coverage.

``--save DIR`` keeps every render's plan and ledger; ``--load DIR`` re-estimates saved renders
without rendering (the figures of one set of renders under another fit: ``--fit-aspect``).
Held-out renders are logged to MLflow (experiment ``estimate_error``) with
``estimate_ratio_shipped``, ``_before``, ``_after`` and ``estimate_band`` beside the usual metrics.

Ratios measure the machine as much as the code: read a shared machine's figures as "at that
load" (the load average is printed per render). Nothing here is a test; it prints, never asserts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg

from pipeline import tracking
from pipeline.calibrate import COVERAGE, WINDOW, cluster_calibration, estimate_band, fit, render_measurements
from pipeline.calibration import Calibration, CalibrationRow, ClusterHistory, Measurements
from pipeline.config import REPO_ROOT, resolve_profile, resolve_settings
from pipeline.cost import PriceCatalog, billed_yuan
from pipeline.dag import Cluster
from pipeline.fingerprint import fingerprint
from pipeline.models import Ledger, RenderPlan
from pipeline.plan import make_plan, stage_rows
from pipeline.render import render
from pipeline.store import open_store
from stages.script import load_episode

EXPERIMENT = "estimate_error"
FIT = REPO_ROOT / "examples" / "episode_en.fountain"
HELD_OUT = [REPO_ROOT / "examples" / "shotlist.yaml", REPO_ROOT / "examples" / "episode_zh.fountain",
            REPO_ROOT.parent / "shared" / "data" / "screenplays" / "afterwriting_jp.fountain"]
PRICED_BY = {"audit": "keyframes", "plates": "keyframes", "sheets": "keyframes"}
WAYS = ("shipped", "before", "after")


@dataclass
class Rendered:
    role: str  # warmup, fit, held, control
    script: Path
    profile: str
    aspect: str
    plan: RenderPlan
    ledger: Ledger
    wall_s: float
    load: str  # the 1-minute load average when it finished

    @property
    def name(self) -> str:
        return f"{self.script.name} @ {self.profile} {self.aspect}"


# --------------------------------------------------------------------------- the previous learning, for comparison


def previous_row(history: list[Measurements]) -> CalibrationRow:
    """How a row was learned before (kept here to compare): each render's nodes fitted on their own
    (``fit``: through the origin below 8 nodes), the median overhead and median slope; the band the
    larger of the median fit residual and the median spread across renders."""
    fits = [fit(m.work, m.seconds) for m in history]
    overhead, slope = statistics.median(o for o, _ in fits), statistics.median(k for _, k in fits)
    residual, across = [], []
    for m, (o, k) in zip(history, fits):
        total = sum(m.seconds)
        if total > 0:
            residual.append(math.sqrt(sum((o + k * w - s) ** 2 for w, s in zip(m.work, m.seconds))) / total)
            across.append(abs(sum(overhead + slope * w for w in m.work) / total - 1))
    band = max(statistics.median(residual) if residual else 0.0, statistics.median(across) if len(across) >= 2 else 0.0)
    newest = history[0]
    return CalibrationRow(stage=newest.stage, backend=newest.backend, device=newest.device, unit=newest.unit,
                          overhead_s=overhead, seconds_per_unit_mpx=slope, band=band, renders=len(history),
                          source="previous learning (median of per-render fits)", measured_at="")


def previous_band(plan: RenderPlan, calibration: Calibration) -> float | None:
    """The previous band of a plan: Σ stage ¥ × its row's band / Σ ¥ over the cluster-priced stages."""
    rows = stage_rows(plan.profile, calibration)
    yuan = pm = 0.0
    for stage, y in plan.estimate_by_stage().items():
        row = rows[PRICED_BY.get(stage, stage)]
        if row.renders:
            yuan, pm = yuan + y, pm + y * (row.band or 0.0)
    return pm / yuan if yuan > 0 else None


# --------------------------------------------------------------------------- rendering


def plan_for(script: Path, profile: str, aspect: str, calibration: Calibration, prices: PriceCatalog) -> RenderPlan:
    return make_plan(load_episode(script), resolve_profile(profile, {"aspect": aspect}), calibration=calibration,
                     prices=prices, script_sha256=hashlib.sha256(script.read_bytes()).hexdigest())


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def render_all(args, jobs: list[tuple[str, Path, str, str]], shipped: Calibration, prices: PriceCatalog,
               save: Path | None) -> list[Rendered]:
    cluster = Cluster(None, resolve_settings().num_cpus)
    out = []
    for n, (role, script, profile, aspect) in enumerate(jobs):
        plan = plan_for(script, profile, aspect, shipped, prices)
        with tempfile.TemporaryDirectory() as tmp:
            result = render(plan, store=open_store(tmp), prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe(),
                            cluster=cluster)
        done = Rendered(role, script, profile, aspect, plan, result.ledger, result.wall_seconds, load_average())
        out.append(done)
        print(f"render {n + 1}/{len(jobs)} {role:7s} {done.name}: wall {done.wall_s:.1f} s, load {done.load}",
              flush=True)
        if save is not None:
            save.mkdir(parents=True, exist_ok=True)
            (save / f"{n:03d}-{role}.json").write_text(json.dumps({
                "role": role, "script": str(script), "profile": profile, "aspect": aspect, "wall_s": done.wall_s,
                "load": done.load, "plan": json.loads(plan.model_dump_json()),
                "ledger": json.loads(result.ledger.model_dump_json())}))
        if role == "held" and not args.no_mlflow:
            done.result = result  # logged once its estimates are known
    return out


def load_all(folder: Path) -> list[Rendered]:
    out = []
    for path in sorted(folder.glob("*.json")):
        d = json.loads(path.read_text())
        out.append(Rendered(d["role"], Path(d["script"]), d["profile"], d["aspect"],
                            RenderPlan.model_validate(d["plan"]), Ledger.model_validate(d["ledger"]), d["wall_s"],
                            d["load"]))
    return out


# --------------------------------------------------------------------------- learning and comparing


def learned(fits: list[Rendered], shipped: Calibration, here) -> tuple[Calibration, Calibration]:
    """(before, after): this cluster's rows from the fit renders, learned the previous way and now."""
    with tempfile.TemporaryDirectory() as store:
        history = ClusterHistory(store, here)
        for i, r in enumerate(fits):  # filed one second apart, in render order
            history.add(render_measurements(r.plan, r.ledger, fingerprint=here, at=1.7e9 + i))
        after = cluster_calibration(shipped, store, here)
        recent, _ = history.recent(WINDOW)
    before = shipped.overlay([previous_row(ms) for _, ms in sorted(recent.items())], cluster=here.label,
                             location="(previous learning)")
    return before, after


def measured_by_stage(ledger: Ledger) -> dict[str, float]:
    """¥ of the executed nodes per stage (the contact sheet is a storyboard node, as in the ledger)."""
    out: dict[str, float] = {}
    for r in ledger.records:
        if not r.cached:
            out[r.stage] = out.get(r.stage, 0.0) + r.yuan
    return out


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def inside(estimate: float, measured: float, band: float | None) -> bool | None:
    return None if band is None else abs(estimate - measured) <= band * estimate


@dataclass
class Case:
    name: str
    control: bool
    ratio: dict[str, float]  # way -> total estimate / measured
    band: dict[str, float | None]  # before / after -> ± fraction
    hit: dict[str, bool | None]  # before / after -> measured total inside the band
    load: str = "?"
    stages: dict[str, tuple[float, float, float]] | None = None  # stage -> (measured ¥, before/meas, after/meas)
    shape: str = ""  # shots, frames, lines, size


def compare(r: Rendered, cals: dict[str, Calibration], prices: PriceCatalog) -> Case:
    plans = {way: plan_for(r.script, r.profile, r.aspect, cal, prices) for way, cal in cals.items()}
    meas = measured_by_stage(r.ledger)
    est = {way: p.estimate_by_stage() for way, p in plans.items()}
    stages = list(dict.fromkeys([*est["after"], *meas]))
    control = " (control: the fit script)" if r.role == "control" else ""
    print(f"--- {r.name}{control} ({plans['after'].width}x{plans['after'].height}, {plans['after'].duration_s:.1f} s, "
          f"{len(plans['after'].shots)} shots, {len(plans['after'].voices)} lines), wall {r.wall_s:.1f} s, "
          f"load {r.load}")
    print(f"{'stage':12s}{'measured ¥':>12s}" + "".join(f"{way + '/meas':>14s}" for way in WAYS))
    for stage in [*stages, "total"]:
        m = sum(meas.values()) if stage == "total" else meas.get(stage, 0.0)
        e = {way: sum(est[way].values()) if stage == "total" else est[way].get(stage, 0.0) for way in WAYS}
        print(f"{stage:12s}{m:12.7f}" + "".join(f"{fmt(e[w] / m if m > 0 else None):>14s}" for w in WAYS))
    m = sum(meas.values())
    totals = {way: sum(est[way].values()) for way in WAYS}
    after_band = estimate_band(plans["after"], cals["after"])
    bands = {"before": previous_band(plans["before"], cals["before"]),
             "after": after_band.band if not after_band.table_yuan else None}
    hits = {w: inside(totals[w], m, bands[w]) for w in bands}
    for w in bands:
        print(f"{w} band ±{fmt(bands[w], '.1%')}: the measured total is "
              f"{ {True: 'inside', False: 'OUTSIDE', None: '—'}[hits[w]] } it")
    print(f"after: {after_band.line().removeprefix('calibration: ')}")
    per_stage = {st: (meas[st], est["before"].get(st, 0.0) / meas[st], est["after"].get(st, 0.0) / meas[st])
                 for st in stages if meas.get(st, 0.0) > 0}
    a = plans["after"]
    shape = f"{len(a.shots)} shots, {a.total_frames} frames, {len(a.voices)} lines, {a.width}x{a.height}"
    return Case(r.name, bool(control), {w: totals[w] / m for w in WAYS}, bands, hits, r.load, per_stage, shape)


def summary(cases: list[Case]) -> None:
    print("--- total estimate / measured ¥ (1.00 = exact) from the same renders: shipped rows, this cluster's rows "
          "learned before and after; ± bands and whether the measured total is inside (held-out, then controls)")
    print(f"{'case':44s}{'shipped':>9s}{'before':>8s}{'after':>8s}{'band before':>13s}{'band after':>12s}")
    mark = {True: " in", False: " OUT", None: ""}
    for c in sorted(cases, key=lambda c: c.control):
        print(f"{c.name + (' (control)' if c.control else ''):44s}{c.ratio['shipped']:9.2f}{c.ratio['before']:8.2f}"
              f"{c.ratio['after']:8.2f}{('±' + fmt(c.band['before'], '.0%') + mark[c.hit['before']]):>13s}"
              f"{('±' + fmt(c.band['after'], '.0%') + mark[c.hit['after']]):>12s}")
    held = [c for c in cases if not c.control]
    if not held:
        return
    print(f"held-out ({len(held)} cases):  {'':8s}{'shipped':>9s}{'before':>8s}{'after':>8s}")
    rows = {
        "geometric mean of estimate/measured": lambda w: math.exp(statistics.fmean(math.log(c.ratio[w]) for c in held)),
        "typical factor off (exp mean |log|)": lambda w: math.exp(statistics.fmean(abs(math.log(c.ratio[w])) for c in held)),
        "worst case (farthest from 1.00)": lambda w: max((c.ratio[w] for c in held), key=lambda x: abs(math.log(x))),
        "cases within 25% (0.75–1.25 ×)": lambda w: sum(0.75 <= c.ratio[w] <= 1.25 for c in held),
    }
    for label, f in rows.items():
        print(f"  {label:42s}" + "".join(f"{f(w):>9.2f}" if not label.startswith("cases") else f"{f(w):>8d}/{len(held)}"
                                          for w in WAYS))
    structure(cases)
    for w in ("before", "after"):
        got = [c.hit[w] for c in held if c.hit[w] is not None]
        widths = [c.band[w] for c in held if c.band[w] is not None]
        meant = f" (meant to hold {COVERAGE:.0%})" if w == "after" else ""
        print(f"  band {w}: holds the measured total in {sum(got)} of {len(got)} cases{meant}; median width "
              f"±{fmt(statistics.median(widths) if widths else None, '.0%')}")


def structure(cases: list[Case]) -> None:
    """What is left once the machine's speed at the time is taken out: each stage's ratio over its
    render's total ratio (1.00: the stage is off exactly as much as the whole render), and how far
    the totals follow the load average."""
    print("  per stage, relative to its render's total (before → after; 1.00 = off no more than the render):")
    for c in cases:
        rel = "  ".join(f"{st} {b / c.ratio['before']:.2f}→{a / c.ratio['after']:.2f}"
                        for st, (_, b, a) in (c.stages or {}).items())
        print(f"    {c.name + (' (control)' if c.control else ''):40s} load {c.load:>6s} [{c.shape}]  {rel}")
    for w in ("before", "after"):
        spread = [abs(math.log(a / c.ratio[w])) for c in cases for st, (m, b, a2) in (c.stages or {}).items()
                  for a in [b if w == "before" else a2] if a > 0]
        weights = [m for c in cases for st, (m, _, _) in (c.stages or {}).items()]
        if spread:
            typical = math.exp(sum(x * y for x, y in zip(spread, weights)) / sum(weights))
            print(f"  {w}: a stage is typically {typical:.2f}× off its render's total (¥-weighted exp mean |log|)")
    pts = [(math.log(float(c.load)), math.log(c.ratio["after"])) for c in cases if c.load.replace(".", "").isdigit()]
    if len(pts) >= 3:
        xs, ys = zip(*pts)
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxy = sum((x - mx) * (y - my) for x, y in pts)
        sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
        if sxx > 0 and syy > 0:
            print(f"  load: log(after estimate/measured) against log(load average) over {len(pts)} renders: "
                  f"r = {sxy / math.sqrt(sxx * syy):.2f}, slope {sxy / sxx:.2f} (r² {sxy ** 2 / (sxx * syy):.0%} of "
                  "the spread is the machine's load)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", type=Path, default=FIT, help="the script this cluster learns from [episode_en]")
    ap.add_argument("--fit-repeats", type=int, default=3, help="renders of the fit script per profile and aspect [3]")
    ap.add_argument("--held-out", type=Path, action="append", help="a script to measure (repeatable) "
                    "[shotlist.yaml, episode_zh.fountain, shared afterwriting_jp.fountain]")
    ap.add_argument("--profile", action="append", help="profile (repeatable) [draft, standard]")
    ap.add_argument("--aspect", action="append", help="aspect of the held-out renders (repeatable) [16:9, 9:16]")
    ap.add_argument("--fit-aspect", action="append", help="aspect of the fit renders (repeatable) [every --aspect]")
    ap.add_argument("--save", type=Path, help="keep every render's plan and ledger in this folder")
    ap.add_argument("--load", type=Path, help="re-estimate the renders saved in this folder; render nothing")
    ap.add_argument("--no-mlflow", action="store_true", help="print only, log nothing")
    args = ap.parse_args()
    held_out = args.held_out or HELD_OUT
    profiles, aspects = args.profile or ["draft", "standard"], args.aspect or ["16:9", "9:16"]
    fit_aspects = args.fit_aspect or aspects
    if args.fit_repeats < 1:
        ap.error(f"--fit-repeats {args.fit_repeats}: at least one fit render is needed")
    if any(s.resolve() == args.fit.resolve() for s in held_out):
        ap.error(f"{args.fit}: the fit script cannot be held out too")

    tracking.mlflow_defaults()
    settings = resolve_settings()
    prices = PriceCatalog.load(settings.prices, usd_cny=settings.usd_cny, tier=settings.price_tier,
                               provider=settings.price_provider)
    shipped = Calibration.load(settings.calibration)  # what a cluster that never rendered prices from
    here = fingerprint(None, settings.num_cpus)  # a local cluster: this machine
    print(f"cluster: {here.label} ({here.id}); shipped rows: {settings.calibration}; load now {load_average()}")

    if args.load:
        done = load_all(args.load)
    else:
        jobs = [("warmup", args.fit, profiles[0], "16:9")]
        jobs += [("fit", args.fit, p, a) for _ in range(args.fit_repeats) for p in profiles for a in fit_aspects]
        jobs += [("held", s, p, a) for s in held_out for p in profiles for a in aspects]
        jobs += [("control", args.fit, p, "16:9") for p in profiles]
        done = render_all(args, jobs, shipped, prices, args.save)
    fits = [r for r in done if r.role == "fit" and r.aspect in fit_aspects]
    before, after = learned(fits, shipped, here)
    print(f"learned from {len(fits)} fit render(s) of {args.fit.name} at {', '.join(fit_aspects)}")
    print(f"{'row':30s}{'before: overhead s':>19s}{'s/(unit·Mpx)':>13s}{'band':>6s}   {'after: overhead s':>18s}"
          f"{'s/unit':>9s}{'s/(unit·Mpx)':>13s}{'band':>6s}")
    for row in sorted((r for r in after.rows if r.renders), key=lambda r: (r.stage, r.backend)):
        old = before.row(row.stage, row.backend, row.device)
        print(f"{row.stage + ' ' + row.backend:30s}{old.overhead_s:19.4f}{old.seconds_per_unit_mpx:13.5f}"
              f"{'±' + fmt(old.band, '.0%'):>6s}   {row.overhead_s:18.4f}{row.seconds_per_unit:9.5f}"
              f"{row.seconds_per_unit_mpx:13.5f}{'±' + fmt(row.band, '.0%'):>6s}")

    cals = {"shipped": shipped, "before": before, "after": after}
    cases = []
    for r in done:
        if r.role in ("held", "control"):
            case = compare(r, cals, prices)
            cases.append(case)
            if getattr(r, "result", None) is not None:
                log(settings, r.plan, r.result, prices, case)
    summary(cases)


def log(settings, plan: RenderPlan, result, prices: PriceCatalog, case: Case) -> None:
    metrics = tracking.render_metrics(plan, result.ledger, wall_seconds=result.wall_seconds, quality=result.quality,
                                      billed_yuan=billed_yuan(prices, result.wall_seconds, result.cluster, None))
    metrics.update({f"estimate_ratio_{w}": v for w, v in case.ratio.items()})
    if case.band["after"] is not None:
        metrics["estimate_band"] = case.band["after"]
    run_id = tracking.log_render(tracking_uri=settings.tracking_uri, plan=plan, ledger=result.ledger, metrics=metrics,
                                 artifacts={}, tags={"purpose": EXPERIMENT, "cluster": "local"}, series=EXPERIMENT,
                                 plan_json=True)
    print(f"MLflow run {run_id} ({settings.tracking_uri})")


if __name__ == "__main__":
    main()
