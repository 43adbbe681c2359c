"""Benchmark: render the 1-minute sample at `draft` from an empty store and print where the time goes.

    .venv/bin/python experiments/bench_render.py [--script examples/episode_en.fountain] [--profile draft]

Prints: wall time (graph only, and with Ray start-up), frames rendered per second, the node
compute in core-seconds (each node's wall time, store I/O included, as the ledger bills it),
and the orchestration overhead — the share of the cores' wall time (wall × cores) spent
outside every node: Ray scheduling, object transfer, driver look-ups, worker start-up and idle
cores at the tail of the graph. Target on a 2-core machine: under 2 minutes, overhead under 10%.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg

from pipeline.store import open_store
from pipeline.calibration import Calibration
from pipeline.config import resolve_profile, resolve_settings
from pipeline.cost import PriceCatalog
from pipeline.plan import make_plan
from pipeline.render import render
from stages.script import load_episode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--script", type=Path, default=Path("examples/episode_en.fountain"))
    ap.add_argument("--profile", default="draft")
    ap.add_argument("--aspect", default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    settings = resolve_settings()
    prices = PriceCatalog.load(settings.prices, usd_cny=settings.usd_cny)
    plan = make_plan(load_episode(args.script), resolve_profile(args.profile, {"aspect": args.aspect}),
                     calibration=Calibration.load(*settings.calibration_paths), prices=prices,
                     script_sha256=hashlib.sha256(args.script.read_bytes()).hexdigest())
    plan_s = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    print(f"episode         {plan.title}: {len(plan.shots)} shots, {plan.total_frames} frames, "
          f"{plan.duration_s:.1f} s at {plan.width}x{plan.height} {plan.profile.fps} fps ({plan.profile.name})")
    print(f"plan            {plan_s:.2f} s (parse + plan, no Ray)")
    # Twice, each into an empty store so every node runs: first on a cluster that has just
    # started (workers still importing), then on the same, now warm, cluster — which is what a
    # studio's long-running cluster or the next render of a batch sees.
    for label in ("cold", "warm"):
        with tempfile.TemporaryDirectory() as tmp:
            result = render(plan, store=open_store(tmp), prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe())
        report(label, plan, result, cores)


def report(label: str, plan, result, cores: int) -> None:
    wall = result.wall_seconds
    compute = result.stage_seconds
    overhead = 1 - compute / (wall * cores)
    by_stage: dict[str, float] = {}
    for r in result.ledger.records:
        by_stage[r.stage] = by_stage.get(r.stage, 0.0) + r.seconds
    first = min(s for _, s, _ in result.spans) - result.started
    shots_end = max(e for name, _, e in result.spans if name != "assemble")
    print(f"--- {label} cluster")
    print(f"ray start       {result.ray_init_seconds:.2f} s")
    print(f"render wall     {wall:.2f} s  ({wall + result.ray_init_seconds:.2f} s with Ray start; target < 120 s)")
    print(f"throughput      {plan.total_frames / wall:.1f} frames/s  ({plan.duration_s / wall:.2f}x real time)")
    print(f"stage compute   {compute:.2f} core-s on {cores} cores: "
          + ", ".join(f"{k} {v:.2f}" for k, v in by_stage.items()))
    print(f"overhead        {overhead:.1%} of {wall * cores:.2f} core-s outside the nodes (target < 10%)")
    # Where it sits: before the first node starts (worker start-up and imports), after the last
    # shot node ends (assemble, collection), the rest is scheduling and idle cores at the tail.
    print(f"  first node    starts {first:.2f} s after submission (worker start-up, imports)")
    inside = sum(e - s for _, s, e in result.spans)
    print(f"  in nodes      {inside:.2f} core-s by wall-clock spans vs {compute:.2f} billed in the ledger")
    print(f"  after shots   {result.started + wall - shots_end:.2f} s (assemble + collection)")
    print(f"cost            ¥{result.ledger.total_yuan:.5f} measured, ¥{plan.estimated_cost_yuan:.5f} estimated")


if __name__ == "__main__":
    main()
