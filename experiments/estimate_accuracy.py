"""Benchmark: the plan's estimate against a measured render, per stage and in total, side by side.

    .venv/bin/python experiments/estimate_accuracy.py [--script examples/episode_en.fountain ...]
        [--profile draft] [--aspect 16:9] [--repeats 2] [--no-mlflow]

Plans each script (``--script`` repeatable; default the English sample) with the profile and
the calibration tables ``anim plan`` uses (the shipped ``cluster/calibration.csv`` under the
rows measured on this machine, if any), then renders it ``--repeats`` times on a local Ray
cluster, each time into a fresh artifact store so every node runs. Per render it prints, for each stage and for the total: the estimated and measured
wall seconds and ¥ and their ratio estimate / measured (1.00 = exact, 0.80 = the estimate is
20% low). The first render runs on a cluster that has just started (workers still importing);
the next ones on the warm cluster. Each render is logged to MLflow (experiment
``estimate_accuracy``) with ``estimate_ratio`` and ``estimate_ratio.<stage>`` beside the
usual render metrics.

This used to be a test (estimate within 25% of measured); it measures the machine as much as
the code — the rows were fitted on one machine at one load — so it lives here. Run it on a
quiet machine; on a shared one, the ratios say how loaded it was.
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import imageio_ffmpeg

from pipeline import tracking
from pipeline.calibration import Calibration
from pipeline.config import resolve_profile, resolve_settings
from pipeline.cost import PriceCatalog, billed_yuan
from pipeline.models import Ledger, RenderPlan
from pipeline.plan import make_plan
from pipeline.render import render
from pipeline.store import open_store
from stages.script import load_episode

EXPERIMENT = "estimate_accuracy"


def compare(plan: RenderPlan, ledger: Ledger) -> dict[str, dict[str, float]]:
    """Per stage and ``total``: estimated and measured seconds and ¥ (measured: executed nodes only)."""
    est_s, est_y = plan.estimate_by_stage("seconds"), plan.estimate_by_stage("yuan")
    rows: dict[str, dict[str, float]] = {}
    for stage in dict.fromkeys([*est_y, *(r.stage for r in ledger.records)]):
        ran = [r for r in ledger.records if r.stage == stage and not r.cached]
        rows[stage] = {"est_s": est_s.get(stage, 0.0), "meas_s": sum(r.seconds for r in ran),
                       "est_yuan": est_y.get(stage, 0.0), "meas_yuan": sum(r.yuan for r in ran)}
    rows["total"] = {k: sum(row[k] for row in rows.values()) for k in ("est_s", "meas_s", "est_yuan", "meas_yuan")}
    return rows


def ratio(est: float, measured: float) -> float | None:
    return est / measured if measured > 0 else None


def print_table(label: str, rows: dict[str, dict[str, float]]) -> None:
    print(f"--- {label}")
    print(f"{'stage':12s}{'est s':>9s}{'meas s':>9s}{'est/meas':>10s}{'est ¥':>12s}{'meas ¥':>12s}{'est/meas':>10s}")
    for stage, r in rows.items():
        rs, ry = ratio(r["est_s"], r["meas_s"]), ratio(r["est_yuan"], r["meas_yuan"])
        print(f"{stage:12s}{r['est_s']:9.2f}{r['meas_s']:9.2f}{_fmt(rs):>10s}"
              f"{r['est_yuan']:12.7f}{r['meas_yuan']:12.7f}{_fmt(ry):>10s}")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--script", type=Path, action="append", help="script to render (repeatable) [episode_en]")
    ap.add_argument("--profile", default="draft")
    ap.add_argument("--aspect", default=None)
    ap.add_argument("--repeats", type=int, default=2, help="renders per script, each into an empty store")
    ap.add_argument("--no-mlflow", action="store_true", help="print only, log nothing")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: at least one render is needed")
    scripts = args.script or [Path("examples/episode_en.fountain")]

    settings = resolve_settings()
    tracking.mlflow_defaults()
    prices = PriceCatalog.load(settings.prices, usd_cny=settings.usd_cny, tier=settings.price_tier,
                               provider=settings.price_provider)
    calibration = Calibration.load(*settings.calibration_paths)  # as `anim plan`: shipped rows < this machine's
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    summary: list[tuple[str, list[float | None]]] = []
    for script in scripts:
        # 1. The plan: what `anim plan` estimates for this script, profile and machine's table.
        plan = make_plan(load_episode(script), resolve_profile(args.profile, {"aspect": args.aspect}),
                         calibration=calibration, prices=prices,
                         script_sha256=hashlib.sha256(script.read_bytes()).hexdigest())
        print(f"{script.name} @ {plan.profile.name} {plan.width}x{plan.height}: {len(plan.shots)} shots, "
              f"{plan.total_frames} frames ({plan.duration_s:.1f} s); rows from {' < '.join(calibration.paths)}")
        totals: list[float | None] = []
        for i in range(args.repeats):
            # 2. A render into an empty store, so every node runs and is measured.
            with tempfile.TemporaryDirectory() as tmp:
                result = render(plan, store=open_store(tmp), prices=prices, ffmpeg=ffmpeg)
            rows = compare(plan, result.ledger)
            label = f"render {i + 1} ({'cold' if i == 0 else 'warm'} cluster), wall {result.wall_seconds:.1f} s"
            print_table(label, rows)
            totals.append(ratio(rows["total"]["est_yuan"], rows["total"]["meas_yuan"]))
            # 3. The run in MLflow: the render's own metrics and the ratios.
            if not args.no_mlflow:
                metrics = tracking.render_metrics(
                    plan, result.ledger, wall_seconds=result.wall_seconds, quality=result.quality,
                    billed_yuan=billed_yuan(prices, result.wall_seconds, result.cluster, None))
                for stage, r in rows.items():
                    if (value := ratio(r["est_yuan"], r["meas_yuan"])) is not None:
                        metrics["estimate_ratio" if stage == "total" else f"estimate_ratio.{stage}"] = value
                run_id = tracking.log_render(
                    tracking_uri=settings.tracking_uri, plan=plan, ledger=result.ledger, metrics=metrics,
                    artifacts={}, tags={"purpose": EXPERIMENT, "cluster": "local", "repeat": str(i + 1)},
                    series=EXPERIMENT, plan_json=True)
                print(f"MLflow run {run_id} ({settings.tracking_uri})")
        summary.append((script.name, totals))
    print("--- total estimate / measured ¥ per render (1.00 = exact; the old test allowed 0.75–1.25)")
    for name, totals in summary:
        print(f"{name:36s}" + "  ".join(_fmt(t) for t in totals))


if __name__ == "__main__":
    main()
