"""The ``anim`` command line: the entry point where config is resolved, once.

    anim plan SCRIPT [--profile P] [--aspect A] [--json]      the plan, without starting Ray
    anim render SCRIPT [--profile P] [--aspect A] [--out DIR] render, track, print the cost

Errors a user can fix (a bad script, an unknown profile) print one line naming the file and
the problem and exit 2; nothing is written to the output folder in that case.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.errors import AnimError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn an episode screenplay into storyboards, keyframes, in-betweens and a finished video.")
out = Console()
err = Console(stderr=True)

ProfileOpt = typer.Option("draft", "--profile", "-p", help="Built-in profile (draft, standard) or a .toml path.")
AspectOpt = typer.Option(None, "--aspect", help="Override the profile's aspect: 16:9 or 9:16.")


def _fail(exc: BaseException, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _prepare(script: Path, profile: str, aspect: str | None):
    """Resolve settings and profile, parse the script and make the plan (pure, no Ray)."""
    from pipeline.calibration import Calibration
    from pipeline.config import resolve_profile, resolve_settings
    from pipeline.cost import PriceCatalog
    from pipeline.plan import make_plan
    from stages.script import load_episode

    settings = resolve_settings()
    prof = resolve_profile(profile, {"aspect": aspect})
    episode = load_episode(script)
    prices = PriceCatalog.load(settings.prices, usd_cny=settings.usd_cny, tier=settings.price_tier)
    plan = make_plan(episode, prof, calibration=Calibration.load(settings.calibration), prices=prices,
                     script_sha256=hashlib.sha256(script.read_bytes()).hexdigest())
    return settings, episode, prices, plan


@app.command()
def plan(script: Path = typer.Argument(..., help="Fountain screenplay or YAML shot list."),
         profile: str = ProfileOpt, aspect: Optional[str] = AspectOpt,
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON.")) -> None:
    """Print the render plan: shots, frames, keyframes and estimated yuan per stage."""
    from pipeline.plan import plan_summary

    try:
        _, _, _, rplan = _prepare(script, profile, aspect)
    except AnimError as exc:
        raise _fail(exc)
    summary = plan_summary(rplan)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        return
    table = Table(title=f"{rplan.title} — {rplan.profile.name} {rplan.width}×{rplan.height} @ {rplan.profile.fps} fps")
    for col in ("shot", "camera", "seconds", "frames", "drawings", "keyframes", "held", "est. ¥"):
        table.add_column(col, justify="left" if col in ("shot", "camera") else "right")
    for s in rplan.shots:
        table.add_row(s.shot.id, s.shot.camera.value, f"{s.frames / rplan.profile.fps:.2f}", str(s.frames),
                      str(len(s.drawings)), str(len(s.keyframes)), str(s.held_frames),
                      f"{sum(s.estimate_yuan.values()):.5f}")
    out.print(table)
    stages = ", ".join(f"{k} ¥{v:.4f}" for k, v in summary["estimated_cost_by_stage_yuan"].items())
    out.print(f"{len(rplan.shots)} shots, {rplan.total_frames} frames ({rplan.duration_s:.1f} s), "
              f"{rplan.total_keyframes} keyframes; estimated ¥{rplan.estimated_cost_yuan:.4f} ({stages})")


@app.command()
def render(script: Path = typer.Argument(..., help="Fountain screenplay or YAML shot list."),
           profile: str = ProfileOpt, aspect: Optional[str] = AspectOpt,
           out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder [default: out/<script>]"),
           progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")) -> None:
    """Render the episode, record its cost in MLflow and print the cost table."""
    import imageio_ffmpeg
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline import dag, tracking
    from pipeline.cache import ArtifactStore

    try:
        settings, episode, prices, rplan = _prepare(script, profile, aspect)
    except AnimError as exc:
        raise _fail(exc)
    out_dir = out_dir or Path("out") / script.stem
    store = ArtifactStore(settings.store)

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("shots · ¥{task.fields[yuan]:.4f} so far"), TimeElapsedColumn(),
                   console=err, disable=not progress, transient=False)
    with bar:
        task = bar.add_task(f"rendering {rplan.title}", total=len(rplan.shots), yuan=0.0)
        try:
            result = dag.render(rplan, store=store, prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe(),
                                ray_address=settings.ray_address, num_cpus=settings.num_cpus,
                                on_progress=lambda done, total, yuan: bar.update(task, completed=done, yuan=yuan))
        except AnimError as exc:
            raise _fail(exc, 1)

    ledger = result.ledger
    cost = {"total_yuan": ledger.total_yuan,
            "records": [r.model_dump() for r in ledger.records],
            "by_stage_yuan": ledger.by_stage(),
            "estimated_yuan": rplan.estimated_cost_yuan,
            "wall_seconds": result.wall_seconds,
            "ray_init_seconds": result.ray_init_seconds}
    config = {"settings": settings.model_dump(), "profile": rplan.profile.model_dump()}
    written = dag.publish(result.outputs, out_dir, {"plan.json": json.loads(rplan.model_dump_json()),
                                                    "cost.json": cost, "config.json": config})
    run_id = tracking.log_render(tracking_uri=settings.tracking_uri, plan=rplan, ledger=ledger,
                                 wall_seconds=result.wall_seconds, artifacts=written,
                                 tags={"cluster": settings.ray_address or "local"},
                                 series=episode.title_page.get("series"))

    table = Table(title=f"cost of {rplan.title} ({rplan.profile.name}, {rplan.duration_s:.1f} s)")
    for col in ("stage", "nodes", "cached", "seconds", "¥"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, yuan in ledger.by_stage().items():
        rows = [r for r in ledger.records if r.stage == stage]
        table.add_row(stage, str(len(rows)), str(sum(r.cached for r in rows)),
                      f"{sum(r.seconds for r in rows):.2f}", f"{yuan:.5f}")
    table.add_row("[bold]total", str(len(ledger.records)), str(sum(r.cached for r in ledger.records)),
                  f"{sum(r.seconds for r in ledger.records):.2f}", f"[bold]{ledger.total_yuan:.5f}")
    out.print(table)
    minutes = rplan.duration_s / 60
    out.print(f"¥{ledger.total_yuan:.5f} (¥{ledger.total_yuan / minutes:.5f}/min; estimated "
              f"¥{rplan.estimated_cost_yuan:.5f}); wall {result.wall_seconds:.1f} s "
              f"+ Ray start {result.ray_init_seconds:.1f} s")
    out.print(f"episode: {written['episode.mp4']}")
    out.print(f"MLflow run: {run_id}  ({settings.tracking_uri})")


def main() -> None:  # pragma: no cover - console-script shim
    app()
