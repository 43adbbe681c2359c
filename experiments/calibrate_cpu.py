"""Measure the CPU stages on this machine and write their rows into cluster/calibration.csv.

Renders a sample with each profile through the real pipeline (local Ray, a fresh artifact
store so every node runs, MLflow run logged), then fits per stage
``seconds = overhead + units × Mpx × k`` over the executed nodes (``pipeline.calibrate``).
Each row records the machine, the date and the MLflow run it came from.

    .venv/bin/python experiments/calibrate_cpu.py                       # draft and standard
    .venv/bin/python experiments/calibrate_cpu.py --profile draft --script examples/episode_en.fountain

Run it on a quiet machine: the rows are what every estimate is computed from. Profiles given
together are fitted together where they share a row (previz, x264 presets), so measure a
profile that loads the CPUs differently (RIFE: torch threads beside ffmpeg) on its own:
``--profile examples/profiles/draft_rife.toml --only inbetween`` writes only its in-between row.
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import imageio_ffmpeg

from pipeline import tracking
from pipeline.store import open_store
from pipeline.calibrate import fit_rows
from pipeline.calibration import Calibration, CalibrationRow
from pipeline.config import resolve_profile, resolve_settings
from pipeline.cost import PriceCatalog, billed_yuan
from pipeline.plan import calibration_keys, make_plan
from pipeline.render import render
from stages.script import load_episode

DEFAULT = [("draft", Path("examples/episode_en.fountain")), ("standard", Path("examples/shotlist.yaml"))]


def measure(script: Path, profile_name: str, settings):
    profile = resolve_profile(profile_name)
    # 1. Plan against zero rows: only the work units matter here, not the estimates.
    zero = Calibration(rows=[
        CalibrationRow(stage=s, backend=b, device=d, unit=u, overhead_s=0, seconds_per_unit_mpx=0,
                       source="bootstrap", measured_at="") for s, (b, d, u) in calibration_keys(profile).items()])
    prices = PriceCatalog.load(settings.prices, usd_cny=settings.usd_cny)
    plan = make_plan(load_episode(script), profile, calibration=zero, prices=prices,
                     script_sha256=hashlib.sha256(script.read_bytes()).hexdigest())
    # 2. Render for real into a fresh store, so every node executes; record the run.
    with tempfile.TemporaryDirectory() as tmp:
        result = render(plan, store=open_store(tmp), prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe())
    metrics = tracking.render_metrics(plan, result.ledger, wall_seconds=result.wall_seconds, quality=result.quality,
                                      billed_yuan=billed_yuan(prices, result.wall_seconds, result.cluster, None))
    run_id = tracking.log_render(tracking_uri=settings.tracking_uri, plan=plan, ledger=result.ledger,
                                 metrics=metrics, artifacts={}, tags={"purpose": "calibration", "cluster": "local"},
                                 series="calibration", plan_json=True)
    print(f"rendered {script.name} at {profile.name} {plan.width}x{plan.height}: wall {result.wall_seconds:.1f} s, "
          f"MLflow run {run_id}")
    return plan, result.ledger, run_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="append", help="profile to measure (repeatable) [draft, standard]")
    ap.add_argument("--script", type=Path, help="script to render [episode_en for draft, shotlist for standard]")
    ap.add_argument("--only", action="append", help="write only these stages' rows (repeatable)")
    args = ap.parse_args()
    tracking.mlflow_defaults()
    settings = resolve_settings()
    jobs = [(p, args.script or dict(DEFAULT).get(p, DEFAULT[0][1])) for p in args.profile] if args.profile else DEFAULT
    # The rows go into the shipped table (the checkout's cluster/calibration.csv, or ANIM_CALIBRATION):
    # the starting point every estimate is computed from, not this user's layer above it.
    table = Calibration.load(settings.calibration)
    # Fit over every render at once: rows shared by profiles (previz at two sizes) pool their nodes.
    rows = fit_rows([measure(script, name, settings) for name, script in jobs],
                    origin="experiments/calibrate_cpu.py " + ", ".join(f"{s.name}@{n}" for n, s in jobs))
    rows = [r for r in rows if not args.only or r.stage in args.only]
    for r in rows:
        print(f"{r.stage:>10} {r.backend:>16}: {r.overhead_s:.4f} s + {r.seconds_per_unit_mpx:.5f} s/(unit·Mpx)")
    table.write(rows)
    print(f"wrote {len(rows)} rows to {table.path}")


if __name__ == "__main__":
    main()
