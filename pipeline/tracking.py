"""MLflow tracking, from the driver only: one run per render.

Experiment = series (the title page's ``Series`` or the episode title); run = one render.
Tags say what was rendered and where; params are the resolved profile; metrics are the
ledger's sums; artifacts are the episode, its storyboard, subtitles, plan, ledger and config.
SQLite-backed MLflow locks under concurrent writers, so workers never log.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from pipeline.models import Ledger, RenderPlan


def mlflow_defaults() -> None:
    """No telemetry, no progress bars on the console. MLflow reads these from the environment,
    so an entry point (the CLI callback, an experiment's ``main``) calls this once before MLflow
    is first used; importing this module changes nothing. Values already set are kept."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def code_version() -> str:
    """The git commit of the checkout, or the package version when not in a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    if sha:
        return sha
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("anim-pipeline")
    except PackageNotFoundError:
        return "unknown"


def _experiment(mlflow: Any, tracking_uri: str, name: str) -> None:
    """Select (or create) the experiment. With a SQLite store, artifacts go beside the database
    file rather than into whatever directory the command was started from."""
    if mlflow.get_experiment_by_name(name) is None and tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        mlflow.create_experiment(name, artifact_location=(db.parent / "mlartifacts").resolve().as_uri())
    mlflow.set_experiment(name)


def render_metrics(plan: RenderPlan, ledger: Ledger, *, wall_seconds: float, billed_yuan: float,
                   quality: dict[str, dict[str, float]], consistency: dict[str, float] | None = None) -> dict[str, float]:
    """The run's metrics: cost (attributed and billed), resources, sizes, cache and quality."""
    minutes = plan.duration_s / 60.0
    executed = [r for r in ledger.records if not r.cached]
    metrics: dict[str, float] = {
        "cost_yuan": ledger.total_yuan,
        "cost_yuan_per_min": ledger.total_yuan / minutes if minutes else 0.0,
        "billed_yuan": billed_yuan,
        "utilization": ledger.total_yuan / billed_yuan if billed_yuan else 0.0,
        "estimated_cost_yuan": plan.estimated_cost_yuan,
        "wall_seconds": wall_seconds,
        "cpu_seconds": sum(r.seconds * r.units for r in executed if r.resource == "cpu"),
        "gpu_seconds": sum(r.seconds * r.units for r in executed if r.resource.startswith("gpu")),
        "frames": plan.total_frames,
        "keyframes": plan.total_keyframes,
        "shots": len(plan.shots),
        "duration_s": plan.duration_s,
        "cache_hit_ratio": sum(r.cached for r in ledger.records) / max(len(ledger.records), 1),
    }
    for stage, yuan in ledger.by_stage().items():
        metrics[f"cost.{stage}_yuan"] = yuan
    for name in ("audit_psnr_db", "audit_ssim", "flicker"):
        values = [q[name] for q in quality.values() if name in q]
        if values:
            metrics[name] = sum(values) / len(values)
            if name != "flicker":
                metrics[f"{name}_min"] = min(values)
    if consistency:
        metrics["character_consistency"] = sum(consistency.values()) / len(consistency)
        for name, score in consistency.items():
            safe = "".join(c if c.isalnum() or c in "_-." else "_" for c in name)
            metrics[f"consistency.{safe}"] = score
    return metrics


def log_render(*, tracking_uri: str, plan: RenderPlan, ledger: Ledger, metrics: dict[str, float],
               artifacts: dict[str, Path], tags: dict[str, str], series: str | None = None,
               quality: dict[str, dict[str, float]] | None = None, plan_json: bool = False) -> str:
    """Log one render as one MLflow run; returns the run id."""
    import mlflow

    from pipeline.report import cost_chart

    mlflow.set_tracking_uri(tracking_uri)
    _experiment(mlflow, tracking_uri, series or plan.title)
    with mlflow.start_run(run_name=f"{plan.title} [{plan.profile.name}]") as run:
        mlflow.set_tags({"script_sha256": plan.script_sha256, "profile": plan.profile.name,
                         "backend": plan.profile.backend, "code_version": code_version(), **tags})
        mlflow.log_params({f"profile.{k}": v for k, v in plan.profile.model_dump().items()})
        mlflow.log_params({"width": plan.width, "height": plan.height})
        mlflow.log_metrics(metrics)
        table: dict[str, list[Any]] = {k: [] for k in ("stage", "shot", "seconds", "resource", "units", "yuan", "cached")}
        for r in ledger.records:
            for k in table:
                table[k].append(getattr(r, k))
        mlflow.log_table(data=table, artifact_file="ledger.json")
        if quality:
            shots = sorted(quality)
            mlflow.log_table(data={"shot": shots, **{m: [quality[s].get(m) for s in shots]
                                                     for m in ("audit_psnr_db", "audit_ssim", "flicker")}},
                             artifact_file="quality.json")
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(cost_chart(ledger, Path(tmp) / "cost_chart.png", title=plan.title)))
            if plan_json and "plan.json" not in {p.name for p in artifacts.values()}:
                (Path(tmp) / "plan.json").write_text(plan.model_dump_json(), encoding="utf-8")
                mlflow.log_artifact(str(Path(tmp) / "plan.json"))
        for path in artifacts.values():
            mlflow.log_artifact(str(path))
        return run.info.run_id
