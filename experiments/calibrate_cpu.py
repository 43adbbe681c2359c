"""Measure the CPU stages on this machine and write their rows into cluster/calibration.csv.

Renders a sample with each profile through the real pipeline (local Ray, a fresh artifact
store, MLflow run logged), then fits, per stage, ``seconds = overhead + units × Mpx × k``
over the executed nodes of the ledger (least squares, overhead ≥ 0). Each row records the
machine, the date and the MLflow run it came from.

    .venv/bin/python experiments/calibrate_cpu.py [--script examples/episode_en.fountain] [--profile draft ...]
"""
from __future__ import annotations

import argparse
import hashlib
import platform
import tempfile
from datetime import date
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from pipeline import dag, tracking
from pipeline.cache import ArtifactStore
from pipeline.calibration import Calibration, CalibrationRow
from pipeline.config import resolve_profile, resolve_settings
from pipeline.cost import PriceCatalog
from pipeline.models import Profile
from pipeline.plan import calibration_keys, make_plan
from stages.script import load_episode


def _keys(p: Profile) -> dict[str, tuple[str, str]]:
    return {stage: (backend, unit) for stage, (backend, _, unit) in calibration_keys(p).items()}


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    x, y = np.asarray(xs), np.asarray(ys)
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        if intercept >= 0 and slope >= 0:
            return float(intercept), float(slope)
    slope = float((x @ y) / (x @ x)) if (x @ x) > 0 else 0.0  # through the origin
    return 0.0, max(slope, 0.0)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def calibrate(script: Path, profile: Profile, settings, table: Calibration) -> list[CalibrationRow]:
    # 1. Plan with zero rows: estimates are irrelevant here, only the work units are.
    zero = Calibration(path=table.path, rows=[
        CalibrationRow(stage=s, backend=b, device="cpu", unit=u, overhead_s=0, seconds_per_unit_mpx=0,
                       source="bootstrap", measured_at="") for s, (b, u) in _keys(profile).items()])
    prices = PriceCatalog.load(settings.prices, usd_cny=settings.usd_cny)
    episode = load_episode(script)
    plan = make_plan(episode, profile, calibration=zero, prices=prices,
                     script_sha256=hashlib.sha256(script.read_bytes()).hexdigest())
    # 2. Render for real into a fresh store, so every node executes.
    with tempfile.TemporaryDirectory() as tmp:
        result = dag.render(plan, store=ArtifactStore(tmp), prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe())
        run_id = tracking.log_render(tracking_uri=settings.tracking_uri, plan=plan, ledger=result.ledger,
                                     wall_seconds=result.wall_seconds, artifacts={},
                                     tags={"purpose": "calibration", "cluster": "local"}, series="calibration")
    # 3. Fit each stage on (units × Mpx, seconds).
    w, h = plan.width, plan.height
    frame_mpx = w * h / 1e6
    panel_w = profile.storyboard_width
    panel_mpx = panel_w * panel_w * (9 / 16 if profile.aspect == "16:9" else 16 / 9) / 1e6
    by_shot = {s.shot.id: s for s in plan.shots}
    work = {"storyboard": lambda s: panel_mpx, "keyframes": lambda s: len(s.keyframes) * frame_mpx,
            "inbetween": lambda s: (len(s.drawings) - len(s.keyframes)) * frame_mpx,
            "encode": lambda s: s.frames * frame_mpx, "assemble": lambda s: plan.total_frames * frame_mpx}
    rows = []
    for stage, (backend, unit) in _keys(profile).items():
        recs = [r for r in result.ledger.records if r.stage == stage and not r.cached]
        xs = [work[stage](by_shot.get(r.shot)) for r in recs]
        overhead, slope = _fit(xs, [r.seconds for r in recs])
        if stage == "assemble":  # a single node: no intercept can be separated from the slope
            overhead, slope = 0.0, slope
        rows.append(CalibrationRow(
            stage=stage, backend=backend, device="cpu", unit=unit, overhead_s=round(overhead, 5),
            seconds_per_unit_mpx=round(slope, 6),
            source=f"measured here: {_cpu_name()}, {len(recs)} nodes of {script.name} at {profile.name} "
                   f"{w}x{h}, MLflow run {run_id}",
            measured_at=str(date.today())))
        print(f"{profile.name:>9} {stage:>10} {backend:>16}: {overhead:.4f} s + {slope:.5f} s/(unit·Mpx)  "
              f"[{len(recs)} nodes, {sum(r.seconds for r in recs):.2f} s]")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--script", type=Path, default=Path("examples/episode_en.fountain"))
    ap.add_argument("--profile", action="append", default=None, help="profile(s) to measure [draft, standard]")
    args = ap.parse_args()
    settings = resolve_settings()
    table = Calibration.load(settings.calibration)
    rows = []
    for name in args.profile or ["draft", "standard"]:
        rows += calibrate(args.script, resolve_profile(name), settings, table)
    table.write(rows)
    print(f"wrote {len(rows)} rows to {table.path}")


if __name__ == "__main__":
    main()
