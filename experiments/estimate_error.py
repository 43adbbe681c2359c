"""Benchmark: estimate error on scripts not used for fitting, before and after this cluster learns.

    .venv/bin/python experiments/estimate_error.py [--fit examples/episode_en.fountain]
        [--fit-repeats 3] [--held-out SCRIPT ...] [--profile draft --profile standard]
        [--aspect 16:9 --aspect 9:16] [--no-mlflow]

In one run, on one local Ray cluster:

1. a warm-up render (not measured), so the first fitted render does not pay the workers' start-up;
2. the **fit** script rendered ``--fit-repeats`` times at every profile (16:9, a fresh store so
   every node runs), each render's measured nodes filed in a fresh cluster history exactly as
   ``anim render`` files them (``pipeline.calibrate.record_render``), and this cluster's rows
   learned from them (``cluster_calibration``: the median of the per-render fits, with a band
   from their residuals and their spread);
3. every **held-out** script (none of them the fit script) at every profile and aspect, planned
   twice — with the shipped rows (**before**: what a cluster that has not rendered yet gets)
   and with this cluster's learned rows (**after**) — then rendered once into a fresh store;
4. as a control, the fit script itself rendered once more at every profile: its after-ratio is
   the machine's drift since the fit renders (load comes and goes on a shared machine), so the
   held-out ratios can be read against it.

For each held-out render it prints, per stage and in total, the measured ¥ and the two
estimates as estimate / measured (1.00 = exact, 0.74 = 26% short), side by side, and the
after-estimate's ± band with whether the measured total fell inside it. The last table is
the totals of every case. Each held-out render is logged to MLflow (experiment
``estimate_error``) with ``estimate_ratio_before``, ``estimate_ratio_after`` and
``estimate_band`` beside the usual metrics.

Ratios measure the machine as much as the code: run it on a quiet machine, and read a shared
machine's figures as "at that load". Nothing here is a test; it prints, never asserts.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import tempfile
from pathlib import Path

import imageio_ffmpeg

from pipeline import tracking
from pipeline.calibrate import cluster_calibration, estimate_band, record_render
from pipeline.calibration import Calibration
from pipeline.config import REPO_ROOT, resolve_profile, resolve_settings
from pipeline.cost import PriceCatalog, billed_yuan
from pipeline.dag import Cluster
from pipeline.fingerprint import fingerprint
from pipeline.models import Ledger, RenderPlan
from pipeline.plan import make_plan
from pipeline.render import render
from pipeline.store import open_store
from stages.script import load_episode

EXPERIMENT = "estimate_error"
FIT = REPO_ROOT / "examples" / "episode_en.fountain"
HELD_OUT = [REPO_ROOT / "examples" / "shotlist.yaml", REPO_ROOT / "examples" / "episode_zh.fountain",
            REPO_ROOT.parent / "shared" / "data" / "screenplays" / "afterwriting_jp.fountain"]


def plan_for(script: Path, profile: str, aspect: str, calibration: Calibration, prices: PriceCatalog) -> RenderPlan:
    return make_plan(load_episode(script), resolve_profile(profile, {"aspect": aspect}), calibration=calibration,
                     prices=prices, script_sha256=hashlib.sha256(script.read_bytes()).hexdigest())


def measured_by_stage(ledger: Ledger) -> dict[str, float]:
    """¥ of the executed nodes per stage (the contact sheet is a storyboard node, as in the ledger)."""
    out: dict[str, float] = {}
    for r in ledger.records:
        if not r.cached:
            out[r.stage] = out.get(r.stage, 0.0) + r.yuan
    return out


def ratio(est: float, measured: float) -> float | None:
    return est / measured if measured > 0 else None


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def compare(before: RenderPlan, after: RenderPlan, ledger: Ledger) -> dict[str, tuple[float, float, float]]:
    """stage (and ``total``) → (measured ¥, before-estimate ¥, after-estimate ¥)."""
    meas, est_b, est_a = measured_by_stage(ledger), before.estimate_by_stage(), after.estimate_by_stage()
    rows = {s: (meas.get(s, 0.0), est_b.get(s, 0.0), est_a.get(s, 0.0)) for s in dict.fromkeys([*est_a, *meas])}
    rows["total"] = tuple(sum(v[i] for v in rows.values()) for i in range(3))
    return rows


def print_case(label: str, rows: dict[str, tuple[float, float, float]], band: float | None) -> None:
    print(f"--- {label}")
    print(f"{'stage':12s}{'measured ¥':>13s}{'before ¥':>13s}{'before/meas':>13s}{'after ¥':>13s}{'after/meas':>12s}")
    for stage, (m, b, a) in rows.items():
        print(f"{stage:12s}{m:13.7f}{b:13.7f}{fmt(ratio(b, m)):>13s}{a:13.7f}{fmt(ratio(a, m)):>12s}")
    m, _, a = rows["total"]
    if band is not None and m > 0:
        inside = abs(a - m) <= band * a
        print(f"after-estimate band ±{band:.1%}: the measured total is {'inside' if inside else 'OUTSIDE'} it")


def fresh_render(plan: RenderPlan, prices: PriceCatalog, cluster: Cluster):
    """A render into an empty store, so every node runs and is measured."""
    with tempfile.TemporaryDirectory() as tmp:
        return render(plan, store=open_store(tmp), prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe(),
                      cluster=cluster)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", type=Path, default=FIT, help="the script this cluster learns from [episode_en]")
    ap.add_argument("--fit-repeats", type=int, default=3, help="renders of the fit script per profile [3]")
    ap.add_argument("--held-out", type=Path, action="append", help="a script to measure (repeatable) "
                    "[shotlist.yaml, episode_zh.fountain, shared afterwriting_jp.fountain]")
    ap.add_argument("--profile", action="append", help="profile (repeatable) [draft, standard]")
    ap.add_argument("--aspect", action="append", help="aspect of the held-out renders (repeatable) [16:9, 9:16]")
    ap.add_argument("--no-mlflow", action="store_true", help="print only, log nothing")
    args = ap.parse_args()
    held_out = args.held_out or HELD_OUT
    profiles, aspects = args.profile or ["draft", "standard"], args.aspect or ["16:9", "9:16"]
    if args.fit_repeats < 1:
        ap.error(f"--fit-repeats {args.fit_repeats}: at least one fit render is needed")
    if any(s.resolve() == args.fit.resolve() for s in held_out):
        ap.error(f"{args.fit}: the fit script cannot be held out too")

    tracking.mlflow_defaults()
    settings = resolve_settings()
    prices = PriceCatalog.load(settings.prices, usd_cny=settings.usd_cny, tier=settings.price_tier,
                               provider=settings.price_provider)
    shipped = Calibration.load(settings.calibration)  # before: what a cluster that never rendered prices from
    here = fingerprint(None, settings.num_cpus)  # a local cluster: this machine
    cluster = Cluster(None, settings.num_cpus)
    print(f"cluster: {here.label} ({here.id}); shipped rows: {settings.calibration}")

    with tempfile.TemporaryDirectory() as history_store:
        # 1. Warm-up: worker processes start and import their libraries here, not in a measured node.
        fresh_render(plan_for(args.fit, profiles[0], "16:9", shipped, prices), prices, cluster)
        # 2. The fit renders, filed as `anim render` files them, and this cluster's rows learned from them.
        for profile in profiles:
            plan = plan_for(args.fit, profile, "16:9", shipped, prices)
            for i in range(args.fit_repeats):
                result = fresh_render(plan, prices, cluster)
                filed = record_render(history_store, here, plan, result.ledger, resources=result.cluster)
                print(f"fit {i + 1}: {args.fit.name} @ {profile} 16:9, {sum(len(m.work) for m in filed)} nodes "
                      f"filed, wall {result.wall_seconds:.1f} s")
        learned = cluster_calibration(Calibration.load(settings.calibration), history_store, here)
        print(f"{'learned row':34s}{'overhead s':>11s}{'s/(unit·Mpx)':>14s}{'shipped':>10s}{'band':>8s}{'fits':>6s}")
        for row in sorted((r for r in learned.rows if r.renders), key=lambda r: (r.stage, r.backend)):
            ship = next((r.seconds_per_unit_mpx for r in shipped.rows if (r.stage, r.backend, r.device) ==
                         (row.stage, row.backend, row.device)), None)
            print(f"{row.stage + ' ' + row.backend:34s}{row.overhead_s:11.4f}{row.seconds_per_unit_mpx:14.5f}"
                  f"{'—' if ship is None else f'{ship:.5f}':>10s}{f'±{row.band:.0%}':>8s}{row.renders:6d}")

        # 3. Held-out scripts: one render each, two estimates side by side; then, as a control, the
        #    fit script itself once more: the machine's drift since the fit, apart from the scripts.
        cases = [(script, profile, aspect) for script in held_out for profile in profiles for aspect in aspects]
        cases += [(args.fit, profile, "16:9") for profile in profiles]
        summary: list[tuple[str, float | None, float | None, float | None]] = []
        for script, profile, aspect in cases:
            control = " (control: the fit script)" if script == args.fit else ""
            before = plan_for(script, profile, aspect, shipped, prices)
            after = plan_for(script, profile, aspect, learned, prices)
            band = estimate_band(after, learned)
            result = fresh_render(after, prices, cluster)
            rows = compare(before, after, result.ledger)
            label = (f"{script.name} @ {profile} {aspect}{control} ({after.width}x{after.height}, "
                     f"{after.duration_s:.1f} s), wall {result.wall_seconds:.1f} s; after: "
                     f"{band.line().removeprefix('calibration: ')}")
            print_case(label, rows, band.band if not band.table_yuan else None)
            m, b, a = rows["total"]
            summary.append((f"{script.name} @ {profile} {aspect}{' (control)' if control else ''}", ratio(b, m),
                            ratio(a, m), band.band))
            if not args.no_mlflow:
                log(settings, after, result, prices, ratio(b, m), ratio(a, m), band.band)

    print("--- total estimate / measured ¥ (1.00 = exact), before → after this cluster learned; held-out scripts, "
          "then the fit script re-rendered last as the control")
    print(f"{'case':52s}{'before':>8s}{'after':>8s}{'band':>9s}")
    for name, b, a, band in summary:
        print(f"{name:52s}{fmt(b):>8s}{fmt(a):>8s}{'' if band is None else f'±{band:.0%}':>9s}")
    logs = [math.log(a) for name, _, a, _ in summary if a and "(control)" not in name]
    before_logs = [math.log(b) for name, b, _, _ in summary if b and "(control)" not in name]
    if logs and before_logs:
        print(f"held-out, geometric mean of estimate/measured: before {math.exp(sum(before_logs) / len(before_logs)):.2f}"
              f", after {math.exp(sum(logs) / len(logs)):.2f}; typical factor off (exp mean |log|): before "
              f"{math.exp(sum(map(abs, before_logs)) / len(before_logs)):.2f}, after "
              f"{math.exp(sum(map(abs, logs)) / len(logs)):.2f}")


def log(settings, plan: RenderPlan, result, prices: PriceCatalog, before: float | None, after: float | None,
        band: float | None) -> None:
    metrics = tracking.render_metrics(plan, result.ledger, wall_seconds=result.wall_seconds, quality=result.quality,
                                      billed_yuan=billed_yuan(prices, result.wall_seconds, result.cluster, None))
    for name, value in (("estimate_ratio_before", before), ("estimate_ratio_after", after), ("estimate_band", band)):
        if value is not None:
            metrics[name] = value
    run_id = tracking.log_render(tracking_uri=settings.tracking_uri, plan=plan, ledger=result.ledger, metrics=metrics,
                                 artifacts={}, tags={"purpose": EXPERIMENT, "cluster": "local"}, series=EXPERIMENT,
                                 plan_json=True)
    print(f"MLflow run {run_id} ({settings.tracking_uri})")


if __name__ == "__main__":
    main()
