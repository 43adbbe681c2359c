"""``anim nightly SERIES [--dry-run] [--server URL]``: tonight's batch of a series manifest.

Plans every episode against the store, renders (in this process, or through the render
service with ``--server``) the ones that changed within the night's cap, then prints the
morning table and logs the night to MLflow. ``--dry-run`` prints what tonight would render and
its estimate, and records nothing. Works from plain cron or a Kubernetes CronJob; the render
service runs each manifest's schedule itself (``pipeline.nightly.run_due``).

Exit codes: 0 done (or nothing to do, or the night already ran), 3 some episodes stopped (the
night's cap, an episode's budget, the approval gate), 1 some failed, 2 a bad manifest or setting.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from pipeline.cli import _fail, err, out
from stages.records import AnimError


def nightly(ctx: typer.Context,
            series: Path = typer.Argument(..., help="Series manifest (.toml, see examples/series/)."),
            dry_run: bool = typer.Option(False, "--dry-run", help="Print what tonight would render and its "
                                         "estimate; render and record nothing."),
            server: Optional[str] = typer.Option(None, "--server", envvar="ANIM_SERVER",
                                                 help="Submit the renders to this render service and wait for "
                                                      "them; without it, render in this process."),
            token: Optional[str] = typer.Option(None, "--token", envvar="ANIM_TOKEN",
                                                help="API token for --server (`anim users token NAME`)."),
            now: Optional[str] = typer.Option(None, "--now", hidden=True,
                                              help="Run as if it were this ISO time (replays, tests).")) -> None:
    """Render every episode of a series whose script or settings changed, within the night's
    cap; print the morning report."""
    from pipeline import nightly
    from pipeline.nightly_report import headline, night_table
    from pipeline.series import load_series

    settings = ctx.obj
    when = _when(now)
    if server and not token:
        raise _fail("--server needs an API token: give --token or set ANIM_TOKEN")
    try:
        spec = load_series(series)
        if dry_run:
            book = _existing_book(settings)
            night = nightly.night_key(spec, when)
            previous = book.previous_rows(spec.name, night) if book else {}
            _print_dry_run(nightly.plan_night(spec, settings, now=when, previous=previous))
            return
        book = nightly.open_nights(settings)
        result = nightly.run_night(spec, settings, now=when, book=book, server=server, token=token,
                                   on_line=lambda line: err.print(line, markup=False, highlight=False))
    except AnimError as exc:
        raise _fail(exc, debug=settings.debug)
    if not result.ran:
        out.print(result.note, markup=False, highlight=False)
        return
    out.print(night_table(spec.name, result.night, result.rows))
    out.print(headline(spec.name, result.night, result.rows), markup=False, highlight=False)
    out.print(f"report: {result.report}" + (f"  MLflow run: {result.run_id}" if result.run_id else ""),
              markup=False, highlight=False)
    if result.note:
        err.print(f"warning: {result.note}", markup=False, highlight=False, soft_wrap=True)
    for row in result.rows:
        if row.status == "failed":
            err.print(f"failed: {row.key}: {row.error}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(result.exit_code)


def _when(text: str | None) -> datetime:
    if text is None:
        return datetime.now(timezone.utc)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise _fail(f"--now {text!r}: expected an ISO time such as 2026-12-02T02:30+08:00") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _existing_book(settings):
    """The night records for reading, or None when they are a file not yet created (a dry run
    creates nothing)."""
    from pipeline.nightly import open_nights

    location = str(settings.nights or "")
    if location and "://" not in location and not Path(location).expanduser().exists():
        return None
    return open_nights(settings)


def _print_dry_run(night) -> None:
    series = night.series
    table = Table(title=escape(f"{series.name} — tonight ({night.night}), dry run"))
    for col in ("episode", "delivery", "tonight", "why", "shots to render", "est. ¥"):
        table.add_column(col, justify="right" if col in ("shots to render", "est. ¥") else "left")
    admitted, waiting = {id(t) for t in night.admitted}, {id(t) for t in night.waiting}
    for t in night.items:
        what = ("render" if id(t) in admitted else "[yellow]waits (night cap)[/]" if id(t) in waiting
                else "[dim]unchanged")
        table.add_row(escape(t.episode.script.name), escape(t.delivery.label), what, escape(t.why or ""),
                      f"{len(t.schedule.shots_to_render)}/{len(t.plan.shots)}", f"{t.estimate_yuan:.5f}")
    for ep, why in night.broken:
        table.add_row(escape(ep.script.name), "", "[red]fails[/]", escape(why), "", "")
    out.print(table)
    episodes = len({t.episode.index for t in night.admitted})
    cap = f" (night cap ¥{series.night_cap_yuan:.5f})" if series.night_cap_yuan is not None else ""
    wait = len({t.episode.index for t in night.waiting})
    if night.broken:
        err.print(f"{len(night.broken)} episodes cannot be planned: "
                  + "; ".join(why for _, why in night.broken[:3]), markup=False, highlight=False, soft_wrap=True)
    if not night.picked:
        out.print(f"tonight: nothing changed in {len(series.episodes)} episodes; nothing to render", markup=False)
        return
    out.print(f"tonight: {episodes} of {len(series.episodes)} episodes ({len(night.admitted)} renders, "
              f"{sum(len(t.schedule.shots_to_render) for t in night.admitted)} shots), estimated "
              f"¥{night.estimate_yuan:.5f}{cap}" + (f"; {wait} episodes wait for the next night" if wait else ""),
              markup=False)
