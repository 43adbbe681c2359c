"""Benchmark: how far a render's spend passes its budget, with calibration rows as measured and
made 3× optimistic, side by side.

    .venv/bin/python experiments/budget_overshoot.py [--script examples/shotlist.yaml] [--profile draft]
        [--fractions 0.2 0.4 0.8 1.5] [--factors 1 3] [--repeats 2] [--no-mlflow]

For each rows factor (1 = the rows ``anim plan`` uses; 3 = every row three times faster than it
was measured, so this machine is three times slower than its rows say) and each budget (a
fraction of what the true rows estimate for the whole episode), renders the script into an
empty store with ``--budget``, then resumes it with the same budget (the budget is the
episode's: the first render's spend counts). Per render it prints spend / budget — everything
billed, the partial time of nodes the cap cancelled included — how much of that was cancelled
nodes, whether the cap had to stop running nodes, the shots finished and whether the contact
sheet was published. The closing line is the worst spend / budget over every render and
attempt per factor: the target is ≤ 1.05 (at most 5% for nodes already running when the cap is
reached). Each render is logged to MLflow (experiment ``budget_overshoot``) with
``budget_yuan``, ``spend_over_budget`` and ``cancelled_yuan`` beside the usual metrics.

Spend on budgets of a few ten-thousandths of a yuan is a fraction of a core-second: on a shared
machine the figures move with its load; the cap holds whatever the load (it reads running
nodes' cost as they run), how much of the budget is used does not.
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
from pipeline.dag import Cluster
from pipeline.plan import make_plan
from pipeline.render import render
from pipeline.store import open_store
from stages.script import load_episode

EXPERIMENT = "budget_overshoot"


def optimistic(calibration: Calibration, factor: float) -> Calibration:
    """The same rows, ``factor`` times faster than they were measured."""
    return Calibration(rows=[r.model_copy(update={"overhead_s": r.overhead_s / factor,
                                                  "seconds_per_unit_mpx": r.seconds_per_unit_mpx / factor})
                             for r in calibration.rows], paths=[])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--script", type=Path, default=Path("examples/shotlist.yaml"))
    ap.add_argument("--profile", default="draft")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.4, 0.8, 1.5],
                    help="budgets, as fractions of the true rows' estimate of the whole episode")
    ap.add_argument("--factors", type=float, nargs="+", default=[1.0, 3.0], help="how optimistic the rows are")
    ap.add_argument("--repeats", type=int, default=2, help="render + resume pairs per budget and factor")
    ap.add_argument("--no-mlflow", action="store_true", help="print only, log nothing")
    args = ap.parse_args()
    if args.repeats < 1 or min(args.fractions) <= 0 or min(args.factors) <= 0:
        ap.error("--repeats, --fractions and --factors must be positive")

    settings = resolve_settings()
    tracking.mlflow_defaults()
    prices = PriceCatalog.load(settings.prices, usd_cny=settings.usd_cny, tier=settings.price_tier,
                               provider=settings.price_provider)
    calibration = Calibration.load(*settings.calibration_paths)
    episode = load_episode(args.script)
    sha = hashlib.sha256(args.script.read_bytes()).hexdigest()
    profile = resolve_profile(args.profile)
    true_estimate = make_plan(episode, profile, calibration=calibration, prices=prices,
                              script_sha256=sha).estimated_cost_yuan
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    Cluster().start()  # one local cluster for every render
    print(f"{args.script.name} @ {profile.name}: the rows estimate ¥{true_estimate:.6f} for the episode")
    print(f"{'rows':>5s} {'budget ¥':>10s} {'try':>4s} {'render':>7s} {'spend/budget':>13s} {'cancelled':>10s} "
          f"{'cap':>4s} {'shots':>6s} {'sheet':>6s}")
    worst: dict[float, float] = {}
    for factor in args.factors:
        plan = make_plan(episode, profile, calibration=optimistic(calibration, factor), prices=prices,
                         script_sha256=sha)
        for fraction in args.fractions:
            budget = fraction * true_estimate
            for attempt in range(args.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    store = open_store(tmp)
                    for which in ("first", "resume"):
                        r = render(plan, store=store, prices=prices, ffmpeg=ffmpeg, budget_yuan=budget)
                        over = r.budget_spent_yuan / budget
                        worst[factor] = max(worst.get(factor, 0.0), over)
                        done = len(plan.shots) - len(r.remaining)
                        print(f"{factor:4.0f}× {budget:10.6f} {attempt + 1:4d} {which:>7s} {over:13.3f} "
                              f"{r.cancelled_yuan / budget:10.3f} {'yes' if r.cap_reached else 'no':>4s} "
                              f"{done:3d}/{len(plan.shots):<2d} {'yes' if 'storyboard.png' in r.outputs else 'NO':>6s}")
                        if not args.no_mlflow:
                            metrics = tracking.render_metrics(
                                plan, r.ledger, wall_seconds=r.wall_seconds, quality=r.quality,
                                billed_yuan=billed_yuan(prices, r.wall_seconds, r.cluster, None))
                            metrics.update(budget_yuan=budget, spend_over_budget=over, cancelled_yuan=r.cancelled_yuan,
                                           episode_spent_yuan=r.episode_spent_yuan)
                            tracking.log_render(
                                tracking_uri=settings.tracking_uri, plan=plan, ledger=r.ledger, metrics=metrics,
                                artifacts={}, series=EXPERIMENT,
                                tags={"purpose": EXPERIMENT, "cluster": "local", "rows_factor": f"{factor:g}",
                                      "attempt": which, "status": r.stopped or "complete"})
    print("--- budget overshoot: the worst spend / budget over every render and resume (target ≤ 1.05)")
    for factor, value in worst.items():
        print(f"rows {factor:g}× optimistic: {value:.3f} ({(value - 1) * 100:+.1f}% against the budget)")


if __name__ == "__main__":
    main()
