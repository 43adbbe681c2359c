"""The ``anim`` command line: the entry point where config is resolved, once.

    anim plan SCRIPT [--profile P] [--aspect A] [--json]      the plan, without starting Ray
    anim render SCRIPT [--profile P] [--aspect A] [--out DIR] render, track, print the cost
        [--budget ¥N] [--stop-after storyboard]
    anim approve SCRIPT --shot ID | --all [--reject] [-m TEXT]  approve (or reject) storyboard panels
    anim approve SCRIPT --list                                each shot's decision: who, when, why
    anim runs / anim compare RUN_A RUN_B                      renders in MLflow, cost deltas
    anim calibrate                                            refresh throughput rows from MLflow runs
    anim cache stats / anim cache gc                          the artifact store
    anim nightly SERIES [--dry-run] [--server URL]            tonight's batch of a series manifest

Errors a user can fix (a bad script, an unknown profile) print one line naming the file and
the problem and exit 2; nothing is written to the output folder in that case.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stages.records import AnimError, NodeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn an episode screenplay into storyboards, keyframes, in-betweens and a finished video.")
out = Console()
err = Console(stderr=True)

ProfileOpt = typer.Option("draft", "--profile", "-p", help="Built-in profile (draft, standard) or a .toml path.")
AspectOpt = typer.Option(None, "--aspect", help="Override the profile's aspect: 16:9 or 9:16.")
GateOpt = typer.Option(None, "--approval-gate/--no-approval-gate",
                       help="Hold back shots whose storyboard panel is not approved (`anim approve`) "
                            "[default: the profile's approval_gate, else on when keyframes run on GPUs].")
SetOpt = typer.Option([], "--set", metavar="FIELD=VALUE",
                      help="Override a profile field (repeatable); a TOML value, tables dotted: "
                           "flow.preset=fast, diffusers.steps=8.")


def _fail(exc: BaseException | str, code: int = 2, *, debug: bool = False) -> typer.Exit:
    """One line naming the problem; with ``--debug`` (ANIM_DEBUG=1) first the full chained
    traceback, and a failed node's traceback as its worker saw it."""
    if debug and isinstance(exc, BaseException):
        err.print("".join(traceback.format_exception(exc)), markup=False, highlight=False)
        if getattr(exc, "remote_traceback", ""):
            err.print(f"in the worker:\n{exc.remote_traceback}", markup=False, highlight=False)
    if isinstance(exc, NodeError):
        exc = f"{exc}; finished nodes are kept in the artifact store and will not be recomputed"
    err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _print_json(data) -> None:
    """Strict JSON on stdout: a NaN or an infinity (JSON has no words for them) is an error."""
    try:
        text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise _fail(AnimError(f"--json: {exc}: a setting or an estimate is not a finite number"), 1) from None
    sys.stdout.write(text + "\n")


def _open_store(settings, *, check_only: bool = False):
    """The configured artifact store. The default one is created on first use, parents and all; one
    the user named (environment, config file) must lie in an existing folder, so a typo is an error.
    ``check_only``: the checks alone, nothing created (before anything reads the location)."""
    from pipeline.store import check_store_location, open_store

    named = settings.sources.get("store", "default") != "default"
    if check_only:
        return check_store_location(settings.store, create_parents=not named)
    return open_store(settings.store, create_parents=not named)


@app.callback()
def options(ctx: typer.Context,
            config: Optional[Path] = typer.Option(None, "--config", metavar="FILE", help="Read settings from this "
                                                  "TOML file only, instead of /etc/anim-pipeline/config.toml then "
                                                  "~/.config/anim-pipeline/config.toml (or ANIM_CONFIG)."),
            debug: bool = typer.Option(False, "--debug", help="Print full tracebacks (or ANIM_DEBUG=1).")) -> None:
    """Resolve the settings once for every command (defaults < config files < environment < options)."""
    from pipeline.config import resolve_settings
    from pipeline.tracking import mlflow_defaults

    try:
        ctx.obj = resolve_settings(config=config, debug=debug or None)
    except AnimError as exc:
        raise _fail(exc)
    mlflow_defaults()


def _prepare(settings, script: Path, profile: str, aspect: str | None, sets: list[str] | None = None, *,
             gpu: str | None = None, spot: bool = False):
    """Apply this command's options to the resolved settings and profile, parse the script and
    make the plan (pure, no Ray)."""
    from pipeline.config import check_backend_files, override_settings, parse_overrides, resolve_profile
    from pipeline.cost import PriceCatalog
    from pipeline.plan import make_plan
    from pipeline.render import music_bed
    from stages.script import load_episode

    settings = override_settings(settings, price_tier="spot" if spot else None)
    prof = resolve_profile(profile, {**parse_overrides(sets or []), "aspect": aspect})
    check_backend_files(prof, profile)  # weights a backend loads: refused here, before any work
    if gpu:
        on_gpu = [stage for stage in ("storyboard", "keyframes", "inbetween") if prof.resources(stage).gpus]
        if not on_gpu:
            raise AnimError(f"--gpu {gpu}: profile {prof.name} runs every stage on CPUs; --gpu prices a profile "
                            "whose backends run on GPUs (see examples/profiles/)")
        for stage in on_gpu:
            prof = prof.with_settings(stage, gpu_type=gpu)
    episode = load_episode(script)
    prices = PriceCatalog.load(settings.prices, usd_cny=settings.usd_cny, tier=settings.price_tier,
                               provider=settings.price_provider)
    _open_store(settings, check_only=True)  # a bad location is its own line, before its rows are read
    calibration = _calibration(settings)
    plan = make_plan(episode, prof, calibration=calibration, prices=prices,
                     script_sha256=hashlib.sha256(script.read_bytes()).hexdigest(), bed=music_bed(episode, prof))
    return settings, episode, prices, plan


def _voiced(settings, episode, prices, plan, store):
    """The plan timed by the voices in the store (the cut follows the voice), or as it was
    (the reading-speed estimate) when none of its lines has been spoken yet."""
    from pipeline.plan import make_plan
    from pipeline.render import stored_speech

    speech = stored_speech(plan, store)
    if not speech:
        return plan
    return make_plan(episode, plan.profile, calibration=_calibration(settings, quiet=True), prices=prices,
                     script_sha256=plan.script_sha256, speech=speech, bed=plan.bed)


def _calibration(settings, *, quiet: bool = False):
    """The shipped and user tables with this cluster's rows, learned from its renders, on top
    (``pipeline.calibrate.cluster_calibration``); a measurements file that cannot be read is
    left out with a warning."""
    from pipeline.calibrate import cluster_calibration
    from pipeline.calibration import Calibration
    from pipeline.fingerprint import fingerprint

    calibration = cluster_calibration(Calibration.load(*settings.calibration_paths), settings.store,
                                      fingerprint(settings.ray_address, settings.num_cpus))
    for line in [] if quiet else calibration.ignored:
        err.print(f"warning: calibration: {line}", markup=False, highlight=False, soft_wrap=True)
    return calibration


@app.command()
def plan(ctx: typer.Context, script: Path = typer.Argument(..., help="Fountain screenplay or YAML shot list."),
         profile: str = ProfileOpt, aspect: Optional[str] = AspectOpt, sets: list[str] = SetOpt,
         gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU type for a diffusers profile, e.g. H100, RTX4090."),
         spot: bool = typer.Option(False, "--spot", help="Price with spot/interruptible rows."),
         budget: Optional[str] = typer.Option(None, "--budget", help="Propose the best profile that fits, e.g. ¥10."),
         write_profile: Optional[Path] = typer.Option(None, "--write-profile", help="Save the proposal as TOML."),
         approval_gate: Optional[bool] = GateOpt,
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON.")) -> None:
    """Print the render plan — shots, frames, keyframes and estimated yuan per stage — and what a
    render would recompute now against the artifact store, without starting Ray."""
    from pipeline.approvals import gate_on, gate_state, open_approvals
    from pipeline.calibrate import estimate_band
    from pipeline.plan import plan_summary
    from pipeline.schedule import schedule, schedule_summary

    budget_yuan = _yuan(budget)
    try:
        settings, episode, prices, rplan = _prepare(ctx.obj, script, profile, aspect, sets, gpu=gpu, spot=spot)
        if budget_yuan is not None:
            _propose(script, episode, rplan, prices, settings, budget_yuan, spot, write_profile, as_json)
            return
        store = _open_store(settings)
        rplan = _voiced(settings, episode, prices, rplan, store)  # timed by the voices the store holds
        gate = gate_state(open_approvals(settings.approvals), rplan, gate_on(rplan.profile, approval_gate))
        sched = schedule(rplan, store, approvals=gate.approvals)
        band = estimate_band(rplan, _calibration(settings, quiet=True))  # which rows priced it, and their band
    except AnimError as exc:
        raise _fail(exc, debug=ctx.obj.debug)
    summary = plan_summary(rplan)
    if as_json:
        summary["calibration"] = band.summary()
        summary["schedule"] = schedule_summary(sched)
        summary["approvals"] = gate.summary()
        _print_json(summary)
        return
    out.print(_plan_table(rplan, sched, gate))
    stages = ", ".join(f"{k} ¥{v:.4f}" for k, v in summary["estimated_cost_by_stage_yuan"].items())
    minutes = rplan.duration_s / 60
    where = ", ".join(f"{stage} on {r.resource}" for stage in ("keyframes", "inbetween")
                      if (r := rplan.profile.resources(stage)))
    out.print(f"{len(rplan.shots)} shots, {rplan.total_frames} frames ({rplan.duration_s:.1f} s), "
              f"{rplan.total_keyframes} keyframes; estimated ¥{rplan.estimated_cost_yuan:.4f}"
              f"{f' ±{band.band:.0%}' if band.band is not None and not band.table_yuan else ''} "
              f"(¥{rplan.estimated_cost_yuan / minutes:.4f} per finished minute, {where}, "
              f"{settings.price_tier}): {stages}", markup=False)
    out.print(band.line(), markup=False, highlight=False)
    spoken = sum(v.measured for v in rplan.voices)
    out.print("timing: " + ("no dialogue" if not rplan.voices else
                            f"measured speech ({spoken} of {len(rplan.voices)} lines)" if rplan.speech_timing == "measured"
                            else f"reading-speed estimate ({spoken} of {len(rplan.voices)} lines spoken so far; a "
                            "render speaks them first and times the cut by them)"), markup=False, highlight=False)
    todo = sched.shots_to_render
    held = f"; held back: {', '.join(sched.held_shots())} ({sched.stopped})" if sched.held_shots() else ""
    if gate.gate:
        held += "; approvals: " + ", ".join(f"{n} {state}" for state, n in gate.counts().items())
    out.print(f"re-render now: {len(todo)} of {len(rplan.shots)} shots, ¥{sched.estimate_yuan:.5f} "
              f"({len(sched.where('run'))} nodes to run, {len(sched.where('hit'))} in the store{held}; "
              f"store {settings.store})", markup=False)


def _plan_table(rplan, sched, gate) -> Table:
    from pipeline.schedule import NodeId

    table = Table(title=escape(f"{rplan.title} — {rplan.profile.name} {rplan.width}×{rplan.height} "
                               f"@ {rplan.profile.fps} fps"))
    for col in ("shot", "camera", "seconds", "frames", "drawings", "keyframes", "held", "est. ¥", "now"):
        table.add_column(col, justify="left" if col in ("shot", "camera", "now") else "right")
    for s in rplan.shots:
        clip = sched[NodeId("clip", s.shot.id)]
        reason = gate[s.shot.id].state if clip.reason == "approval" else clip.reason  # pending or rejected
        now = {"hit": "[dim]stored", "run": "render"}.get(clip.state, f"held ({reason})")
        table.add_row(escape(s.shot.id), s.shot.camera.value, f"{s.frames / rplan.profile.fps:.2f}", str(s.frames),
                      str(len(s.drawings)), str(len(s.keyframes)), str(s.held_frames),
                      f"{sum(s.estimate_yuan.values()):.5f}", now)
    return table


def _propose(script, episode, rplan, prices, settings, budget_yuan, spot, write_profile, as_json) -> None:
    from pipeline.optimize import fit_budget

    prop = fit_budget(episode, rplan.profile, budget_yuan, calibration=_calibration(settings, quiet=True),
                      prices=prices.with_tier("on-demand"), allow_spot=spot, script_sha256=rplan.script_sha256)
    if write_profile:
        import tomli_w

        data = prop.profile.toml_data()
        try:
            write_profile.write_text(tomli_w.dumps(data), encoding="utf-8")
        except OSError as exc:
            raise AnimError(f"--write-profile {write_profile}: cannot write it ({exc.strerror or exc})") from None
    if as_json:
        _print_json({"fits": prop.fits, "estimate_yuan": prop.estimate_yuan, "tier": prop.tier,
                     "budget_yuan": budget_yuan, "steps": prop.steps, "profile": prop.profile.model_dump()})
        return
    table = Table(title=escape(f"fitting {rplan.title} into ¥{budget_yuan}"))
    table.add_column("step")
    table.add_column("estimate ¥", justify="right")
    for what, yuan in prop.steps:
        table.add_row(escape(what), f"{yuan:.5f}")
    out.print(table)
    changed = _changes(rplan.profile.model_dump(), prop.profile.model_dump())
    verdict = "fits" if prop.fits else "does NOT fit even at the cheapest settings"
    out.print(f"proposal {verdict}: ¥{prop.estimate_yuan:.5f} ({prop.tier}) for ¥{budget_yuan}; "
              f"changes: {changed or 'none'}", markup=False)
    if write_profile:
        out.print(f"written to {write_profile}: anim render {script} --profile {write_profile}", markup=False)
    if not prop.fits:
        raise typer.Exit(3)


def _changes(before: dict, after: dict, prefix: str = "") -> dict[str, object]:
    """Flat ``{"field": new}`` of what differs, nested tables as ``diffusion.steps``."""
    out: dict[str, object] = {}
    for key, value in after.items():
        if key == "name" or value == before.get(key):
            continue
        if isinstance(value, dict) and isinstance(before.get(key), dict):
            out.update(_changes(before[key], value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _yuan(text: str | None) -> float | None:
    """'¥12.5', '12.5', '12.5元' → 12.5; one clear error otherwise."""
    if text is None:
        return None
    cleaned = text.strip().lstrip("¥￥").removesuffix("元").removesuffix("CNY").strip()
    try:
        value = float(cleaned)
    except ValueError:
        raise _fail(f"--budget {text!r}: expected an amount in yuan such as ¥10 or 2.5") from None
    if not math.isfinite(value):
        raise _fail(f"--budget {text!r}: expected a finite amount in yuan such as ¥10 or 2.5")
    if value < 0:
        raise _fail(f"--budget {text!r}: a budget cannot be negative")
    return value


@app.command()
def render(ctx: typer.Context, script: Path = typer.Argument(..., help="Fountain screenplay or YAML shot list."),
           profile: str = ProfileOpt, aspect: Optional[str] = AspectOpt, sets: list[str] = SetOpt,
           out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder, in a folder that "
                                                  "exists [default: out/<script>-<profile>-<aspect>]"),
           budget: Optional[str] = typer.Option(None, "--budget", help="Cap spend, e.g. ¥0.5: the episode's "
                                                "across resumed renders (see --budget-scope); nodes still running "
                                                "when it is reached are cancelled, their time billed."),
           budget_scope: str = typer.Option("episode", "--budget-scope", help="'episode': what earlier renders "
                                            "of this episode spent counts against --budget; 'render': this "
                                            "invocation only."),
           stop_after: Optional[str] = typer.Option(None, "--stop-after", help="'storyboard': panels and "
                                                    "contact sheet only, for approval before keyframes."),
           approval_gate: Optional[bool] = GateOpt,
           progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
           progress_file: Optional[Path] = typer.Option(None, "--progress-file", metavar="FILE", help="Append the "
                                                        "render's progress as JSON lines (stage, shots done, ¥ so "
                                                        "far, the MLflow run), for a job service to read.")) -> None:
    """Render the episode, record its cost in MLflow and print the cost table."""
    import imageio_ffmpeg

    from pipeline import tracking
    from pipeline.approvals import gate_on, gate_state, open_approvals, preview_clips
    from pipeline.dag import Cluster
    from pipeline.publish import check_out_dir, default_out_dir, publish
    from pipeline.ledger import episode_ledger
    from pipeline.render import render as run_render
    from pipeline.render import speak

    # 1. Everything resolved and checked before Ray starts.
    budget_yuan = _yuan(budget)
    if budget_scope not in ("episode", "render"):
        raise _fail(f"--budget-scope {budget_scope!r}: 'episode' or 'render'")
    if stop_after not in (None, "storyboard"):
        raise _fail(f"--stop-after {stop_after!r}: the only stop is 'storyboard'")
    try:
        settings, episode, prices, rplan = _prepare(ctx.obj, script, profile, aspect, sets)
        # an --out the user typed must lie in an existing folder; the default out/ is created
        check_out_dir(out_dir or default_out_dir(script, profile, rplan.profile.aspect), create_parents=out_dir is None)
        store = _open_store(settings)
        # The voices first (cheap, billed): the cut follows them.
        cluster = Cluster(settings.ray_address, settings.num_cpus, store=settings.store)
        spent = episode_ledger(rplan, store).total_yuan if budget_yuan is not None and budget_scope == "episode" \
            else 0.0  # the voices are spoken under the cap too
        spoken = speak(rplan, store=store, prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe(), cluster=cluster,
                       budget_yuan=budget_yuan, spent_yuan=spent)
        rplan = _voiced(settings, episode, prices, rplan, store)
        gate = gate_state(open_approvals(settings.approvals), rplan, gate_on(rplan.profile, approval_gate))
        # The MLflow run opens now (RUNNING; plan and estimate first). Only a tracking URI the
        # user must fix raises; an unreachable server is reported once, after the outputs are safe.
        live = tracking.RenderRun(settings.tracking_uri, rplan, series=episode.title_page.get("series"),
                                  script=script, tags={"cluster": settings.ray_address or "local", **gate.tags()},
                                  budget_yuan=budget_yuan, spool=tracking.Spool(store.url), store=store)
        live.start(background=True)  # MLflow's start-up overlaps the render
    except AnimError as exc:
        raise _fail(exc, debug=ctx.obj.debug)
    out_dir = out_dir or default_out_dir(script, profile, rplan.profile.aspect)

    # 2. Render, with a progress bar of shots and yuan (and the JSON lines of --progress-file).
    feed = _ProgressFeed(progress_file, len(rplan.shots), lambda: (live.run_id, live.experiment_id))
    with _progress(rplan, progress) as on_progress:
        try:
            result = run_render(rplan, store=store, prices=prices, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe(),
                                cluster=cluster, spoken=spoken, approvals=gate.approvals,
                                budget_yuan=budget_yuan, budget_scope=budget_scope, stop_after=stop_after,
                                on_progress=lambda *p: (on_progress(*p), live.on_progress(*p), feed.on_progress(*p)),
                                on_node=lambda *n: (live.on_node(*n), feed.on_node(*n)))
        except AnimError as exc:
            live.abort("error", str(exc))
            raise _fail(exc, 1, debug=ctx.obj.debug)
        except BaseException as exc:  # Ctrl-C, or the executor itself failing: the run says so first
            live.abort("interrupted" if isinstance(exc, KeyboardInterrupt) else "error", repr(exc))
            raise

    # 3. Publish the finished artifacts (all of them, or the storyboard sheet and the clips already
    #    rendered, shot-<id>.mp4, for the producer to watch) with the JSON records.
    metrics, cost = _money(rplan, result, prices, budget_yuan)
    config = {"settings": settings.model_dump(), "profile": rplan.profile.model_dump()}
    outputs = result.outputs if result.stopped is None else {**result.outputs, **preview_clips(rplan, store)}
    documents = {"cost.json": cost, "config.json": config, "approvals.json": gate.summary()}
    try:
        written = publish(outputs, out_dir, {"plan.json": json.loads(rplan.model_dump_json()), **documents})
    except AnimError as exc:
        live.abort("error", str(exc))
        raise _fail(exc, 1, debug=ctx.obj.debug)
    # The record goes to the spool first, then to MLflow: a tracking failure now loses nothing.
    tracked = live.finish(live.record(ledger=result.ledger, metrics=metrics, stopped=result.stopped,
                                      quality=result.quality, artifacts=written, documents=documents,
                                      store_keys=[rplan.assemble_key, rplan.contact_sheet_key]))
    run_id = tracked.run_id
    feed.end(run_id)
    # 4. Tell the producer.
    _report(rplan, result, metrics, written, budget_yuan)
    lost = _tracking_note(tracked, settings.tracking_uri, out_dir)
    _learn(settings, rplan, result, run_id)  # 5. this cluster's rows learn from the nodes just measured
    if lost:
        raise typer.Exit(1)
    if result.stopped is not None:
        raise typer.Exit(0 if result.stopped == "storyboard" else 3)


def _tracking_note(tracked, tracking_uri: str, out_dir: Path) -> bool:
    """The MLflow run, or one line saying why there is none yet and where the render's record
    waits; True when the record is lost (it could be neither logged nor kept)."""
    if tracked.run_id:
        out.print(f"MLflow run: {tracked.run_id}  ({tracking_uri})", markup=False)
    elif tracked.pending:
        err.print(f"warning: MLflow at {tracking_uri} did not take this render ({tracked.error}); the episode "
                  f"is published in {out_dir} and its record waits in {tracked.pending}: `anim runs` or the next "
                  "render logs it", markup=False, highlight=False, soft_wrap=True)
    else:
        err.print(f"error: MLflow at {tracking_uri} did not take this render ({tracked.error}) and {tracked.lost}; "
                  f"the episode and cost.json are published in {out_dir}", markup=False, highlight=False,
                  soft_wrap=True)
        return True
    for what, ids in (("logged {} earlier render(s) that were waiting", tracked.relogged),
                      ("closed {} run(s) whose driver is gone as KILLED", tracked.closed)):
        if ids:
            err.print(f"{what.format(len(ids))}: {', '.join(i[:8] for i in ids)}", markup=False, highlight=False)
    return False


class _ProgressFeed:
    """``--progress-file``: one JSON line per finished node (its stage) and per progress step
    (shots done, ¥ so far), each with the shot count and the MLflow run; a line is flushed as it
    is written. Never stops a render: a write that fails turns the feed off."""

    def __init__(self, path: Path | None, shots_total: int, run: Callable[[], tuple[str | None, str | None]]):
        self.shots_total, self.run = shots_total, run  # (run id, experiment id): opened while the render goes on
        self.file = None
        if path is not None:
            try:
                self.file = path.open("a", encoding="utf-8", buffering=1)
            except OSError as exc:
                err.print(f"warning: --progress-file {path}: {exc.strerror or exc}", markup=False, highlight=False)
        self._write(event="start", stage="start", shots_done=0, spent_yuan=0.0)

    def _write(self, **fields) -> None:
        if self.file is None:
            return
        try:
            run_id, experiment_id = self.run()
            self.file.write(json.dumps({"t": round(time.time(), 3), "shots_total": self.shots_total,
                                        "run_id": run_id, "experiment_id": experiment_id, **fields}) + "\n")
        except (OSError, ValueError):
            self.file = None

    def end(self, run_id: str | None) -> None:
        """The render's outputs are published and its record logged (``run_id``: its MLflow run)."""
        self._write(event="end", stage="published", run_id=run_id)

    def on_node(self, node, rows) -> None:
        self._write(event="node", stage=node.stage, shot=getattr(node, "shot", None),
                    node_yuan=sum(r.yuan for r in rows))

    def on_progress(self, done: int, total: int, yuan: float) -> None:
        self._write(event="progress", shots_done=done, spent_yuan=yuan)


@contextmanager
def _progress(rplan, enabled: bool):
    """A progress bar of finished shots and yuan spent; yields the render's progress callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("shots · ¥{task.fields[yuan]:.4f} so far"), TimeElapsedColumn(),
                   console=err, disable=not enabled, transient=False)
    with bar:
        task = bar.add_task(escape(f"rendering {rplan.title}"), total=len(rplan.shots), yuan=0.0)
        yield lambda done, total, yuan: bar.update(task, completed=done, yuan=yuan)


def _learn(settings, rplan, result, run_id: str) -> None:
    """File the render's measured nodes in this cluster's calibration history. The render is
    paid for and published by now: whatever goes wrong here is one warning, never a failure."""
    from pipeline.calibrate import record_render
    from pipeline.fingerprint import fingerprint

    try:
        filed = record_render(settings.store, fingerprint(settings.ray_address, settings.num_cpus), rplan,
                              result.ledger, run=run_id, resources=result.cluster)
    except Exception as exc:  # noqa: BLE001 - any filesystem's own error kind; the render already succeeded
        err.print(f"warning: this cluster's calibration was not updated from this render: {type(exc).__name__}: "
                  f"{exc}", markup=False, highlight=False, soft_wrap=True)
        return
    if filed:
        out.print(f"calibration: {sum(len(m.work) for m in filed)} measured nodes of {len(filed)} rows filed for "
                  f"{filed[0].fingerprint.label}; the next plan prices from them", markup=False, highlight=False)


def _money(rplan, result, prices, budget_yuan):
    """The run's metrics and ``cost.json``: attributed (nodes), billed (itemised: model load, warm-up,
    busy, idle, cluster start; ``pipeline.cost.billed_view``), utilization, quality."""
    from pipeline import tracking

    ledger = result.ledger
    billed = result.billed.billed_yuan
    metrics = tracking.render_metrics(rplan, ledger, wall_seconds=result.wall_seconds, billed_yuan=billed,
                                      quality=result.quality, consistency=result.consistency)
    metrics["episode_spent_yuan"] = result.episode_spent_yuan  # every render of the episode so far
    metrics.update({f"billed.{part}_yuan": yuan for part, yuan in result.billed.parts_yuan.items()})
    cost = {"total_yuan": ledger.total_yuan,  # this render's spend; the episode's is episode_spent_yuan
            "records": [r.model_dump() for r in ledger.records],
            "by_stage_yuan": ledger.by_stage(),
            "estimated_yuan": rplan.estimated_cost_yuan,
            "scheduled_yuan": result.schedule.estimate_yuan,
            "billed_yuan": billed, "utilization": metrics["utilization"],
            "billed": {**result.billed.model_dump(), "parts_yuan": result.billed.parts_yuan,
                       "startups": [r.model_dump() for r in result.startups]},
            "budget_yuan": budget_yuan, "status": result.stopped or "complete",
            "episode_spent_yuan": result.episode_spent_yuan, "spent_before_yuan": result.spent_before_yuan,
            "budget_scope": result.budget_scope, "budget_spent_yuan": result.budget_spent_yuan,
            "cancelled_nodes": result.cancelled, "cancelled_yuan": result.cancelled_yuan,
            "cap_reached": result.cap_reached, "budget_note": result.budget_note, "render_id": result.render_id,
            "remaining_shots": result.remaining, "remaining_estimate_yuan": result.remaining_estimate_yuan,
            "quality": result.quality, "character_consistency": result.consistency,
            "wall_seconds": result.wall_seconds, "ray_init_seconds": result.ray_init_seconds}
    return metrics, cost


def _report(rplan, result, metrics, written, budget_yuan) -> None:
    ledger = result.ledger
    out.print(_cost_table(rplan, ledger))
    minutes = rplan.duration_s / 60
    out.print(f"¥{ledger.total_yuan:.5f} attributed (¥{ledger.total_yuan / minutes:.5f}/min; estimated "
              f"¥{rplan.estimated_cost_yuan:.5f}); billed ¥{metrics['billed_yuan']:.5f}, utilization "
              f"{metrics['utilization']:.0%}; wall {result.wall_seconds:.1f} s + Ray start {result.ray_init_seconds:.1f} s")
    cap = f" / budget ¥{budget_yuan:.5f} ({result.budget_scope})" if budget_yuan is not None else ""
    cut = (f"; {len(result.cancelled)} node(s) cancelled at the cap, ¥{result.cancelled_yuan:.5f} of their time billed"
           if result.cancelled else "")
    out.print(f"spent so far ¥{result.episode_spent_yuan:.5f}{cap} — this render ¥{ledger.total_yuan:.5f}, earlier "
              f"renders of the episode ¥{result.spent_before_yuan:.5f}{cut}", markup=False)
    if "audit_psnr_db" in metrics:
        out.print(f"in-between audit: {metrics['audit_psnr_db']:.2f} dB PSNR, SSIM {metrics['audit_ssim']:.4f} "
                  f"(mean of {sum('audit_psnr_db' in q for q in result.quality.values())} shots)")
    if result.stopped is None:
        out.print(f"episode: {written['episode.mp4']}", markup=False)
        return
    left = f"{len(result.remaining)} shots remain (estimated ¥{result.remaining_estimate_yuan:.5f}): " \
           f"{', '.join(result.remaining[:12])}{' …' if len(result.remaining) > 12 else ''}"
    reason = {"storyboard": "stopped after the storyboard as asked; approve with `anim approve`",
              "approval": "waiting for storyboard approval (`anim approve`)",
              "budget": result.budget_note or f"budget ¥{budget_yuan} reached before the next node"}[result.stopped]
    if "storyboard.png" in written:
        out.print(f"storyboard: {written['storyboard.png']}", markup=False)
    if previews := [name for name in written if name.startswith("shot-") and name.endswith(".mp4")]:
        out.print(f"{len(previews)} finished shots to preview in {written[previews[0]].parent}: "
                  f"{', '.join(previews[:8])}{' …' if len(previews) > 8 else ''}", markup=False)
    err.print(f"[yellow]{escape(reason)}[/]; {escape(left)}. Finished work is kept: the next render resumes from it.")


def _cost_table(rplan, ledger) -> Table:
    table = Table(title=escape(f"cost of {rplan.title} ({rplan.profile.name}, {rplan.duration_s:.1f} s)"))
    for col in ("stage", "shots", "cached", "seconds", "¥"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, yuan in ledger.by_stage().items():
        rows = [r for r in ledger.records if r.stage == stage]
        # A stage may be measured in two nodes of a shot (the audit: drawing, then comparing):
        # count shots, not rows.
        table.add_row(stage, str(len({r.shot for r in rows})), str(len({r.shot for r in rows if r.cached})),
                      f"{sum(r.seconds for r in rows):.2f}", f"{yuan:.5f}")
    table.add_row("[bold]total", "", f"{sum(r.cached for r in ledger.records)}/{len(ledger.records)} rows",
                  f"{sum(r.seconds for r in ledger.records):.2f}", f"[bold]{ledger.total_yuan:.5f}")
    return table


@app.command()
def approve(ctx: typer.Context, script: Path = typer.Argument(..., help="The script whose storyboard you reviewed."),
            profile: str = ProfileOpt, aspect: Optional[str] = AspectOpt, sets: list[str] = SetOpt,
            shot: list[str] = typer.Option([], "--shot", "-s", help="Shot id to decide on (repeatable)."),
            all_shots: bool = typer.Option(False, "--all", help="Decide on every shot."),
            reject: bool = typer.Option(False, "--reject", help="Reject instead of approve (needs --comment)."),
            comment: str = typer.Option("", "--comment", "-m", help="Why: what to keep, or what to change."),
            by: Optional[str] = typer.Option(None, "--by", help="Who decides [default: your user name]."),
            list_only: bool = typer.Option(False, "--list", help="Show each shot's latest decision; record nothing.")
            ) -> None:
    """Approve or reject storyboard panels, or list the decisions. A decision follows the shot's
    content and aspect: it holds at every profile until the shot is edited."""
    from pipeline.approvals import decide, gate_on, gate_state, open_approvals

    # 1. What to decide on, checked before anything is recorded.
    if list_only and (shot or all_shots or reject or comment or by):
        raise _fail("--list shows the decisions; give --shot/--all (and --reject, --comment, --by) without --list "
                    "to decide")
    if not list_only and not shot and not all_shots:
        raise _fail("give --shot ID (repeatable) or --all to decide, or --list to see the decisions")
    try:
        settings, _, _, rplan = _prepare(ctx.obj, script, profile, aspect, sets)
        book = open_approvals(settings.approvals)
        if not list_only:
            ids = {s.shot.id: s for s in rplan.shots}
            unknown = [s for s in shot if s not in ids]
            if unknown:
                raise AnimError(f"{script}: no shot {', '.join(unknown)}; shots are {', '.join(ids)}")
            chosen = list(ids.values()) if all_shots else [ids[s] for s in dict.fromkeys(shot)]
            store = _open_store(settings)
            missing = [s.shot.id for s in chosen if store.get(s.keys["storyboard"]) is None]
            if missing:
                raise AnimError(f"{script}: no storyboard panel yet for {', '.join(missing)} at profile "
                                f"{rplan.profile.name}; render it first with `anim render --stop-after storyboard`")
            # 2. Record the decision, all shots or none.
            book.record(decide(rplan, chosen, "rejected" if reject else "approved", by=by or _user(),
                               comment=comment))
        state = gate_state(book, rplan, gate_on(rplan.profile))
    except AnimError as exc:
        raise _fail(exc, debug=ctx.obj.debug)
    # 3. Every shot's latest decision.
    table = Table(title=escape(f"storyboard decisions — {rplan.title} ({book.location})"))
    for col in ("shot", "decision", "by", "at (UTC)", "at profile", "comment"):
        table.add_column(col)
    for s in state.shots:
        d = s.latest
        style = {"approved": "green", "rejected": "red", "pending": "dim"}[s.state]
        table.add_row(escape(s.shot), f"[{style}]{s.state}", *(escape(v) for v in (
            (d.by, d.at.strftime("%Y-%m-%d %H:%M"), d.profile, d.comment) if d else ("", "", "", ""))))
    out.print(table)
    if not state.gate:
        why = "approval_gate = false" if rplan.profile.approval_gate is False else "its keyframes run on CPUs"
        out.print(f"[dim]the approval gate is off for profile {escape(rplan.profile.name)} ({why}): "
                  "render with --approval-gate to hold back shots that are not approved")


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):
        raise _fail("cannot tell who you are from the environment; say who decides with --by NAME") from None


from pipeline.cli_cache import cache_app  # noqa: E402  (sub-commands live in their own modules)
from pipeline.cli_nightly import nightly  # noqa: E402
from pipeline.cli_runs import calibrate, compare, runs  # noqa: E402

app.command()(runs)
app.command()(compare)
app.command()(calibrate)
app.command()(nightly)
app.add_typer(cache_app, name="cache")

from pipeline import cli_service  # noqa: E402  (anim serve, submit, jobs, job, cancel, retry, users)

cli_service.register(app)


def main() -> None:  # pragma: no cover - console-script shim
    app()
