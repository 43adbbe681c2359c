"""The morning report of a night: what changed, what it cost, what the store saved, whether
quality held — one MLflow run per night (experiment = series), a Markdown file with the cost
chart beside it, and the same table on the console.

One row per episode delivery: its status, shots changed of its shots, ¥ spent tonight, ¥ saved
by cache hits (what the stored nodes cost when they were computed), the in-between audit's PSNR
and the flicker with their change against the previous night, and a failure's one-line reason.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from pipeline.nightly import Row
    from pipeline.series import Series

COLUMNS = ("episode", "delivery", "status", "shots", "¥ spent", "¥ saved", "PSNR dB (Δ)", "flicker (Δ)",
           "why / reason")


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _delta(now: float | None, before: float | None, fmt: str) -> str:
    if now is None or before is None:
        return "" if now is None else "new"
    return format(now - before, "+" + fmt)


def cells(row: "Row") -> list[str]:
    """A row's cells as text, in ``COLUMNS`` order."""
    reason = row.error if row.status in ("failed", "stopped", "waiting") else (row.why or "")
    return [row.episode, row.delivery, row.status, f"{row.shots_changed}/{row.shots}", f"{row.spent_yuan:.5f}",
            f"{row.saved_yuan:.5f}", _with_delta(row.audit_psnr_db, row.prev_audit_psnr_db, ".2f"),
            _with_delta(row.flicker, row.prev_flicker, ".4f"), reason or ""]


def _with_delta(now: float | None, before: float | None, fmt: str) -> str:
    """``28.41 (+0.02)``: tonight's value and its change against the previous night (``new``:
    the previous night had none)."""
    return "" if now is None else f"{format(now, fmt)} ({_delta(now, before, fmt)})"


def headline(series_name: str, night: str, rows: list["Row"]) -> str:
    """One line: how many rendered, what it cost and saved, or that nothing changed."""
    done = [r for r in rows if r.status in ("rendered", "stopped", "failed")]
    spent = sum(r.spent_yuan for r in rows)
    saved = sum(r.saved_yuan for r in rows)
    if not done and not any(r.status == "waiting" for r in rows):
        return (f"{series_name}, night {night}: nothing changed — {len(rows)} deliveries unchanged, nothing "
                f"rendered, ¥0 spent (¥{saved:.5f} of work reused from the store)")
    counts = {s: sum(r.status == s for r in rows) for s in ("rendered", "unchanged", "stopped", "waiting", "failed")}
    shots = sum(r.shots_changed for r in rows if r.status != "waiting" and r.status != "unchanged")
    return (f"{series_name}, night {night}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
            + f"; {shots} shots re-rendered, ¥{spent:.5f} spent, ¥{saved:.5f} saved by cache hits")


def night_table(series_name: str, night: str, rows: list["Row"]) -> Table:
    """The morning table for the console (user text escaped)."""
    table = Table(title=escape(f"{series_name} — night {night}"))
    numeric = {"shots", "¥ spent", "¥ saved", "PSNR dB (Δ)", "flicker (Δ)"}
    for col in COLUMNS:
        table.add_column(col, justify="right" if col in numeric else "left",
                         overflow="fold" if col == "why / reason" else "ellipsis")
    style = {"failed": "red", "stopped": "yellow", "waiting": "yellow", "unchanged": "dim"}
    for row in rows:
        values = [escape(c) for c in cells(row)]
        values[2] = f"[{style[row.status]}]{values[2]}[/]" if row.status in style else values[2]
        table.add_row(*values)
    table.add_row("[bold]total", "", "", str(sum(r.shots_changed for r in rows if r.status not in
                                                  ("unchanged", "waiting"))),
                  f"[bold]{sum(r.spent_yuan for r in rows):.5f}", f"{sum(r.saved_yuan for r in rows):.5f}",
                  *[""] * 3)
    return table


def markdown(series_name: str, night: str, rows: list["Row"], chart: str | None) -> str:
    """The report as Markdown: the headline, the table, the chart."""
    def md(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# {md(series_name)} — night {night}", "", md(headline(series_name, night, rows)), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(md(c) for c in cells(r)) + " |" for r in rows]
    if chart:
        lines += ["", f"![¥ spent and saved per episode]({chart})"]
    return "\n".join(lines) + "\n"


def cost_chart(series_name: str, night: str, rows: list["Row"], path: Path) -> Path:
    """Bars per delivery: ¥ spent tonight beside ¥ saved by cache hits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patheffects

    from pipeline.report import FAMILY, register_cjk_font

    register_cjk_font()
    labels = [f"{r.episode}\n{r.delivery}" for r in rows]
    with plt.rc_context({"font.family": FAMILY}):
        fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) + 2), 4.2), dpi=110)
        try:
            xs = range(len(rows))
            ax.bar([x - 0.2 for x in xs], [r.spent_yuan for r in rows], width=0.4, label="¥ spent tonight")
            ax.bar([x + 0.2 for x in xs], [r.saved_yuan for r in rows], width=0.4, label="¥ saved by cache hits")
            ax.set_xticks(list(xs), labels, rotation=90, fontsize=7)
            ax.set_ylabel("¥")
            ax.set_title(f"{series_name} — night {night}\n¥{sum(r.spent_yuan for r in rows):.5f} spent, "
                         f"¥{sum(r.saved_yuan for r in rows):.5f} saved", fontsize=9)
            ax.legend(fontsize=7)
            # The CJK font's default instance is a hairline (see pipeline.report): stroke it to regular.
            for text in fig.findobj(matplotlib.text.Text):
                text.set_path_effects([patheffects.withStroke(linewidth=0.5, foreground=text.get_color())])
            fig.tight_layout()
            fig.savefig(path)
        finally:
            plt.close(fig)
    return path


def write_report(series: "Series", night: str, rows: list["Row"]) -> dict[str, Path]:
    """``report.md``, ``cost_chart.png`` and ``night.json`` under ``RESULTS/nights/<night>/``."""
    folder = Path(series.results) / "nights" / re.sub(r"[^0-9A-Za-z._-]+", "-", night)
    folder.mkdir(parents=True, exist_ok=True)
    chart = cost_chart(series.name, night, rows, folder / "cost_chart.png")
    files = {"cost_chart.png": chart}
    files["report.md"] = folder / "report.md"
    files["report.md"].write_text(markdown(series.name, night, rows, chart.name), encoding="utf-8")
    files["night.json"] = folder / "night.json"
    files["night.json"].write_text(json.dumps({"series": series.name, "night": night,
                                               "rows": [asdict(r) for r in rows]}, indent=2, ensure_ascii=False),
                                   encoding="utf-8")
    return files


def log_night(tracking_uri: str, series: "Series", night: str, rows: list["Row"], files: dict[str, Path],
              *, now: datetime) -> str:
    """One MLflow run for the night in the series' experiment: totals as metrics, each delivery's
    spend, savings and shots changed as metrics stepped by its place in the series, the files as
    artifacts. Raises TrackingError."""
    from pipeline import tracking

    client = tracking.client(tracking_uri)
    try:
        exp = tracking.experiment(client, tracking_uri, series.name)
        run = client.create_run(exp, run_name=f"night {night}", start_time=int(now.timestamp() * 1000),
                                tags={"kind": "nightly", "night": night, "series_manifest": str(series.manifest),
                      "script": series.manifest.name, "profile": "nightly",  # how `anim runs` lists it
                                      "code_version": tracking.code_version(),
                                      "status": _status(rows)})
        run_id = run.info.run_id
        metrics = {"night_spent_yuan": sum(r.spent_yuan for r in rows),
                   "night_saved_yuan": sum(r.saved_yuan for r in rows),
                   "shots_changed": float(sum(r.shots_changed for r in rows if r.status not in
                                              ("unchanged", "waiting"))),
                   **{f"episodes_{s}": float(sum(r.status == s for r in rows))
                      for s in ("rendered", "unchanged", "stopped", "waiting", "failed")}}
        for name, value in metrics.items():
            client.log_metric(run_id, name, value)
        for step, r in enumerate(rows):
            client.log_metric(run_id, "episode_spent_yuan", r.spent_yuan, step=step)
            client.log_metric(run_id, "episode_saved_yuan", r.saved_yuan, step=step)
            client.log_metric(run_id, "episode_shots_changed", r.shots_changed, step=step)
            if r.audit_psnr_db is not None:
                client.log_metric(run_id, "episode_audit_psnr_db", r.audit_psnr_db, step=step)
        client.log_param(run_id, "night_cap_yuan", str(series.night_cap_yuan))
        client.log_param(run_id, "episodes", str(len(series.episodes)))
        for path in files.values():
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, "FAILED" if any(r.status == "failed" for r in rows) else "FINISHED")
    except tracking.TrackingError:
        raise
    except Exception as exc:  # MLflow's and the database's own errors: one line
        raise tracking.TrackingError(f"tracking store {tracking_uri}: {tracking.summary(exc)}") from exc
    return run_id


def _status(rows: Iterable["Row"]) -> str:
    statuses = {r.status for r in rows}
    for status in ("failed", "stopped", "waiting"):
        if status in statuses:
            return status
    return "complete"


def publish_night(series: "Series", night: str, rows: list["Row"], tracking_uri: str, *,
                  now: datetime) -> tuple[str | None, Path, str | None]:
    """Write the report files and log the night's run; returns (run id, report.md, why MLflow did
    not take it). A tracking store that does not answer loses nothing: the files are written first."""
    from pipeline.tracking import TrackingError

    files = write_report(series, night, rows)
    try:
        return log_night(tracking_uri, series, night, rows, files, now=now), files["report.md"], None
    except TrackingError as exc:
        return None, files["report.md"], str(exc)
