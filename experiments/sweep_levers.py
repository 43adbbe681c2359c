"""Lever sweep: render a sample on the previz backend with one lever turned at a time, measure cost and quality.

Every configuration is rendered for real (local Ray, one fresh temporary artifact store each,
so every node executes and nothing is reused between configurations) from the first
``--seconds`` of the sample script. Around the built-in ``draft`` profile it turns, one at a
time, the levers that exist as profile fields — keyframe stride, animating on ones/twos/threes,
the in-betweener and its flow preset, holds for static shots, the frame size — and then a few
combinations. The in-betweeners include RIFE and the adaptive router (its defaults, and the
flow-first rule that keeps confident pairs on the flow), read from ``--rife-weights``; they are
the rows that say what the adaptive router costs and gains on the product's own drawings rather
than on the live-action triplets of ``interp_bench.py``. Per configuration it records:

* measured cost: the ledger total (attributed ¥: CPU core-seconds × the catalog's CPU price),
  mean of ``--repeats`` renders after one unlogged warm-up render, and ¥ per finished minute;
  the render's wall time; generated keyframes;
* quality: the in-between fidelity audit (PSNR and SSIM of the in-betweener's frame against a
  real keyframe-backend drawing at the same instant) and temporal flicker, each the mean over
  the sample's MOVING shots only — a static shot rendered without a hold audits a frame
  against an identical drawing (PSNR ≈ 56 dB), which would flatter that configuration;
* for the adaptive router, the share of keyframe pairs it sent to RIFE (``to_rife``).

One MLflow run per configuration (experiment ``lever_sweep``, tags ``lever``/``value``) plus a
summary run holding the table and the Pareto chart (¥/min vs audit PSNR, the Pareto front —
no other configuration is both cheaper and better — highlighted and every point labelled).

    .venv/bin/python experiments/sweep_levers.py [--script examples/episode_en.fountain] [--seconds 20]
        [--only CONFIG ...] [--name lever_sweep] [--rife-weights PATH]

Writes experiments/results/NAME.csv and experiments/results/NAME_pareto.png.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import imageio_ffmpeg

from pipeline import tracking
from pipeline.render import render
from pipeline.store import open_store
from pipeline.calibration import Calibration, CalibrationRow
from pipeline.config import REPO_ROOT, resolve_profile, resolve_settings
from pipeline.cost import PriceCatalog, billed_yuan
from stages.records import Episode
from pipeline.models import Profile
from pipeline.plan import calibration_keys, make_plan
from stages.script import load_episode

RESULTS = Path(__file__).resolve().parent / "results"
EXPERIMENT = "lever_sweep"
BASE = "draft"
# RIFE 4.x weights for the rife and adaptive rows: the shared copy, or `make rife-weights`'s.
SHARED_WEIGHTS = REPO_ROOT.parent / "shared" / "data" / "weights" / "rife" / "flownet.pkl"
MADE_WEIGHTS = REPO_ROOT / "models" / "rife" / "flownet.pkl"
WEIGHTS = str(SHARED_WEIGHTS if SHARED_WEIGHTS.exists() else MADE_WEIGHTS)
# The adaptive router's flow-first rule: confident pairs stay on the flow (stages/inbetween_adaptive.py).
FLOW_FIRST = {"threshold": 0.5, "subtle_motion": 0.002, "subtle_alone": False}

# (lever, value shown, profile overrides): one lever at a time around `draft`, then combinations.
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("baseline", "draft", {}),
    *[("keyframe_stride", str(v), {"keyframe_stride": v}) for v in (2, 4, 8, 12)],
    *[("animate_on", str(v), {"animate_on": v}) for v in (1, 3)],
    ("interpolation", "crossfade", {"interpolation": "crossfade"}),
    ("interpolation", "rife", {"interpolation": "rife", "rife": {"weights": WEIGHTS}}),
    ("interpolation", "rife-one", {"interpolation": "rife", "rife": {"weights": WEIGHTS, "passes": "one"}}),
    ("interpolation", "adaptive", {"interpolation": "adaptive", "adaptive": {"weights": WEIGHTS}}),
    ("interpolation", "adaptive-flow-first",
     {"interpolation": "adaptive", "adaptive": {"weights": WEIGHTS, **FLOW_FIRST}}),
    *[("flow_preset", v, {"flow": {"preset": v}}) for v in ("fast", "medium")],
    ("hold_static", "off", {"hold_static": False}),
    ("short_side", "540", {"short_side": 540}),
    ("combo", "stride12+threes", {"keyframe_stride": 12, "animate_on": 3}),
    ("combo", "stride2+ones+medium", {"keyframe_stride": 2, "animate_on": 1, "flow": {"preset": "medium"}}),
    ("combo", "stride8+threes+crossfade", {"keyframe_stride": 8, "animate_on": 3, "interpolation": "crossfade"}),
]

COLUMNS = ["config", "lever", "value", "cost_yuan", "cost_yuan_per_min", "wall_s", "cpu_seconds", "frames",
           "keyframes", "audit_psnr_db", "audit_ssim", "flicker", "audit_shots", "to_rife", "duration_s",
           "mlflow_run"]


def config_name(lever: str, value: str) -> str:
    """A configuration's name in the table and for ``--only``: ``draft`` for the baseline, else ``lever=value``."""
    return f"{lever}={value}" if lever != "baseline" else BASE


def with_weights(overrides: dict[str, Any], weights: str) -> dict[str, Any]:
    """``overrides`` with every ``weights`` field of its tables (rife, adaptive) set to ``weights``."""
    return {k: ({**v, "weights": weights} if isinstance(v, dict) and "weights" in v else v)
            for k, v in overrides.items()}


def rife_share(quality: dict[str, dict[str, Any]]) -> float | None:
    """The share of keyframe pairs the adaptive router sent to RIFE, over every shot; None for other in-betweeners."""
    routes = [v for v in quality.values() if "route_rife" in v]
    pairs = sum(v["route_flow"] + v["route_rife"] + v["route_fallback"] for v in routes)
    return sum(v["route_rife"] for v in routes) / pairs if pairs else None


def sub_episode(episode: Episode, seconds: float) -> Episode:
    """The episode's first shots, up to and including the one that reaches ``seconds``."""
    scenes, total = [], 0.0
    for scene in episode.scenes:
        shots = []
        for shot in scene.shots:
            if total >= seconds:
                break
            shots.append(shot)
            total += shot.duration_s
        if shots:
            scenes.append(scene.model_copy(update={"shots": shots}))
        if total >= seconds:
            break
    return episode.model_copy(update={"scenes": scenes})


def with_placeholders(calibration: Calibration, profile: Profile) -> Calibration:
    """The calibration table plus a zero row for any stage it has no row for (e.g. flow:medium).

    The sweep reports measured cost from the ledger; the plan's estimate is not used, so a
    missing row only means "no estimate", never a wrong measurement.
    """
    rows = list(calibration.rows)
    for stage, (backend, device, unit) in calibration_keys(profile).items():
        if not any((r.stage, r.backend, r.device) == (stage, backend, device) for r in rows):
            rows.append(CalibrationRow(stage=stage, backend=backend, device=device, unit=unit, overhead_s=0.0,
                                       seconds_per_unit_mpx=0.0, source="placeholder: no calibration row",
                                       measured_at=""))
    return calibration.model_copy(update={"rows": rows})


def pareto_front(rows: list[dict[str, Any]], cost: str = "cost_yuan_per_min",
                 quality: str = "audit_psnr_db") -> list[dict[str, Any]]:
    """Rows no other row dominates (cost ≤ and quality ≥, one of them strictly), cheapest first.

    Rows without a quality value (no in-betweens to audit) are left out.
    """
    pts = [r for r in rows if r.get(quality) is not None]
    front = []
    for r in pts:
        dominated = any(o[cost] <= r[cost] and o[quality] >= r[quality]
                        and (o[cost] < r[cost] or o[quality] > r[quality]) for o in pts)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r[cost])


def pareto_chart(rows: list[dict[str, Any]], front: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("audit_psnr_db") is not None]
    on_front = {r["config"] for r in front}
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    ax.scatter([r["cost_yuan_per_min"] for r in pts], [r["audit_psnr_db"] for r in pts],
               c=["tab:red" if r["config"] in on_front else "tab:gray" for r in pts], s=36, zorder=3)
    ax.plot([r["cost_yuan_per_min"] for r in front], [r["audit_psnr_db"] for r in front], "-", color="tab:red",
            lw=1.2, zorder=2, label="Pareto front: nothing else is both cheaper and better")
    for r in pts:
        ax.annotate(r["config"], (r["cost_yuan_per_min"], r["audit_psnr_db"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("measured cost, ¥ per finished minute (previz, CPU)")
    ax.set_ylabel("in-between audit PSNR, dB (mean over moving shots)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_config(lever: str, value: str, overrides: dict[str, Any], episode: Episode, sha: str,
               settings: Any, calibration: Calibration, prices: PriceCatalog, ffmpeg: str,
               repeats: int) -> dict[str, Any]:
    # 1. Profile and plan (estimates unused: cost is measured).
    name = config_name(lever, value)
    profile = resolve_profile(BASE, overrides).replace(name=f"sweep:{name}")
    plan = make_plan(episode, profile, calibration=with_placeholders(calibration, profile), prices=prices,
                     script_sha256=sha)
    # 2. Render into a fresh store each time: every node runs. Renders of a few seconds are
    #    noisy, so cost and wall are the mean of ``repeats`` renders; quality is deterministic.
    results = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
            results.append(render(plan, store=open_store(tmp), prices=prices, ffmpeg=ffmpeg))
    result = results[-1]
    # 3. Measure and log: the last render's ledger, with cost and wall averaged over the repeats.
    billed = billed_yuan(prices, result.wall_seconds, result.cluster, None)
    metrics = tracking.render_metrics(plan, result.ledger, wall_seconds=result.wall_seconds, billed_yuan=billed,
                                      quality=result.quality)
    minutes = plan.duration_s / 60.0
    mean_cost = sum(r.ledger.total_yuan for r in results) / repeats
    metrics.update(cost_yuan=mean_cost, cost_yuan_per_min=mean_cost / minutes,
                   wall_seconds=sum(r.wall_seconds for r in results) / repeats,
                   cpu_seconds=sum(sum(x.seconds * x.units for x in r.ledger.records if not x.cached)
                                   for r in results) / repeats,
                   repeats=repeats)
    run_id = tracking.log_render(tracking_uri=settings.tracking_uri, plan=plan, ledger=result.ledger,
                                 metrics=metrics, artifacts={}, series=EXPERIMENT, quality=result.quality,
                                 tags={"lever": lever, "value": value, "purpose": "lever_sweep",
                                       "cluster": "local"})
    moving = {s.shot.id for s in plan.shots if not s.shot.static}
    q = [v for shot, v in result.quality.items() if shot in moving]
    return {
        "config": name, "lever": lever, "value": value,
        "cost_yuan": mean_cost, "cost_yuan_per_min": metrics["cost_yuan_per_min"],
        "wall_s": metrics["wall_seconds"], "cpu_seconds": metrics["cpu_seconds"], "frames": plan.total_frames,
        "keyframes": plan.total_keyframes,
        "audit_psnr_db": _mean([v["audit_psnr_db"] for v in q if "audit_psnr_db" in v]),
        "audit_ssim": _mean([v["audit_ssim"] for v in q if "audit_ssim" in v]),
        "flicker": _mean([v["flicker"] for v in q if "flicker" in v]),
        "audit_shots": sum("audit_psnr_db" in v for v in q), "to_rife": rife_share(result.quality),
        "duration_s": plan.duration_s, "mlflow_run": run_id,
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--script", type=Path, default=Path("examples/episode_en.fountain"))
    ap.add_argument("--seconds", type=float, default=20.0, help="render the script's first shots up to this long")
    ap.add_argument("--repeats", type=int, default=2, help="renders per configuration (cost and wall averaged)")
    ap.add_argument("--only", action="append", default=None, help="run only these config names (repeatable)")
    ap.add_argument("--name", default="lever_sweep", help="results/NAME.csv and results/NAME_pareto.png")
    ap.add_argument("--rife-weights", type=Path, default=Path(WEIGHTS),
                    help="RIFE 4.x flownet.pkl for the rife and adaptive rows (`make rife-weights` writes one)")
    args = ap.parse_args()
    configs = [(lever, value, with_weights(o, str(args.rife_weights))) for lever, value, o in CONFIGS
               if not args.only or config_name(lever, value) in args.only]
    if any(o.get("interpolation") in ("rife", "adaptive") for _, _, o in configs) and not args.rife_weights.is_file():
        raise SystemExit(f"--rife-weights {args.rife_weights}: no such file (run `make rife-weights`, "
                         "or leave the rife and adaptive rows out with --only)")

    tracking.mlflow_defaults()
    settings = resolve_settings()
    prices = PriceCatalog.load(settings.prices, usd_cny=settings.usd_cny, tier=settings.price_tier)
    calibration = Calibration.load(*settings.calibration_paths)
    episode = sub_episode(load_episode(args.script), args.seconds)
    sha = hashlib.sha256(args.script.read_bytes()).hexdigest()
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    print(f"{episode.title}: first {len(episode.shots)} shots, {episode.duration_s:.1f} s, "
          f"{sum(s.static for s in episode.shots)} static; CPU price "
          f"¥{prices.yuan_per_hour('cpu'):.4f}/core-hour ({prices.row('cpu').provider}, {prices.tier})")

    # A cold cluster's first render pays worker start-up and imports: render once, unlogged, first.
    # Each render gets a Cluster of its own (a local one, started by the first): a Cluster reused
    # across renders reports its first start-up in every later render's ray_init_seconds.
    with tempfile.TemporaryDirectory(prefix="sweep-warmup-") as tmp:
        warm = make_plan(episode, resolve_profile(BASE), calibration=calibration, prices=prices, script_sha256=sha)
        render(warm, store=open_store(tmp), prices=prices, ffmpeg=ffmpeg)

    rows = []
    t0 = time.perf_counter()
    for lever, value, overrides in configs:
        name = config_name(lever, value)
        row = run_config(lever, value, overrides, episode, sha, settings, calibration, prices, ffmpeg,
                         args.repeats)
        rows.append(row)
        print(f"  {name:<32} ¥{row['cost_yuan']:.6f}  ¥{row['cost_yuan_per_min']:.5f}/min  wall {row['wall_s']:.1f} s  "
              f"kf {row['keyframes']:>3}  PSNR {_fmt(row['audit_psnr_db'])}  SSIM {_fmt(row['audit_ssim'])}  "
              f"flicker {_fmt(row['flicker'])}  to RIFE {_fmt(row['to_rife'])}", flush=True)
    print(f"sweep: {len(rows)} renders in {time.perf_counter() - t0:.0f} s")

    front = pareto_front(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path = RESULTS / f"{args.name}.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS + ["pareto"])
        writer.writeheader()
        on_front = {r["config"] for r in front}
        for r in rows:
            writer.writerow({**{k: r[k] for k in COLUMNS}, "pareto": r["config"] in on_front})
    png = pareto_chart(rows, front, RESULTS / f"{args.name}_pareto.png",
                       f"Lever sweep on previz: {episode.title}, first {episode.duration_s:.0f} s, around '{BASE}'")

    print()
    print("| config | ¥ | ¥/min | wall s | keyframes | PSNR dB | SSIM | flicker | to RIFE | Pareto |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['cost_yuan']:.6f} | {r['cost_yuan_per_min']:.5f} | {r['wall_s']:.1f} | "
              f"{r['keyframes']} | {_fmt(r['audit_psnr_db'])} | {_fmt(r['audit_ssim'])} | {_fmt(r['flicker'])} | "
              f"{_fmt(r['to_rife'])} | "
              f"{'yes' if r['config'] in on_front else ''} |")
    print("\nPareto front (¥/min ↑, PSNR ↑): " + " → ".join(
        f"{r['config']} (¥{r['cost_yuan_per_min']:.5f}/min, {r['audit_psnr_db']:.2f} dB)" for r in front))

    import mlflow

    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_experiment(EXPERIMENT)  # created by the per-config runs above
    with mlflow.start_run(run_name="lever sweep summary") as run:
        mlflow.set_tags({"purpose": "lever_sweep_summary", "code_version": tracking.code_version(),
                         "script": str(args.script), "seconds": str(args.seconds)})
        mlflow.log_metrics({"configs": len(rows), "pareto_points": len(front)})
        mlflow.log_artifact(str(csv_path))
        mlflow.log_artifact(str(png))
    print(f"wrote {csv_path} and {png}; MLflow experiment '{EXPERIMENT}', summary run {run.info.run_id}")


if __name__ == "__main__":
    main()
