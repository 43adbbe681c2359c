"""``anim cache``: look at and trim the artifact store that every render shares.

    anim cache stats [--store URL] [--json]
    anim cache gc [--older-than 30d] [--max-size 10G] [--dry-run] [--store URL] [--json]

The store is ``--store``, else the resolved settings' store (``ANIM_STORE``, a config file,
else the per-user cache directory). A value the user can fix (a size or age that does not
parse, a store that cannot be opened) prints one line and exits 2.
"""
from __future__ import annotations

import re
import sys
import time
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from stages.records import AnimError

cache_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        help="Inspect and trim the artifact store shared by every render.")
out = Console()
err = Console(stderr=True)

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``12h``, ``30d``, ``2w`` (or plain seconds) → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not m:
        raise ValueError(f"expected an age like 90s, 15m, 12h, 30d or 2w, got {text!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def parse_size(text: str) -> int:
    """``500M``, ``10G``, ``1.5T``, ``800K`` (powers of 1024; ``B``/``iB`` optional) or plain bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise ValueError(f"expected a size like 800K, 500M, 10G or 2T (powers of 1024), got {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_age(epoch: float | None, now: float) -> str:
    if epoch is None:
        return "—"
    seconds = max(0.0, now - epoch)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _option(parse):
    """Wrap a parser so click reports its message as the option's error (exit 2, no traceback)."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return convert


def _fail(exc: BaseException, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _open_store(settings, store: str | None):
    """The store: ``--store`` on top of the settings the CLI resolved once (``ANIM_STORE``, a config
    file, else the per-user cache)."""
    from pipeline.store import open_store
    from pipeline.config import override_settings

    return open_store(override_settings(settings, store=store).store)


StoreOpt = typer.Option(None, "--store", metavar="URL",
                        help="A local path or fsspec URL (s3://, oss://) [default: ANIM_STORE or the per-user cache].")
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON.")


@cache_app.command()
def stats(ctx: typer.Context, store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Entries and size per stage, last use, damaged entries and staging leftovers."""
    try:
        s = _open_store(ctx.obj, store).stats()
    except AnimError as exc:
        raise _fail(exc)
    if as_json:
        sys.stdout.write(s.model_dump_json(indent=2) + "\n")
        return
    now = time.time()
    table = Table(title=f"artifact store {s.location}")
    for col in ("stage", "entries", "size"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, usage in s.by_stage.items():
        table.add_row(stage, str(usage.entries), human_size(usage.bytes))
    table.add_row("[bold]total", f"[bold]{s.entries}", f"[bold]{human_size(s.bytes)}")
    out.print(table)
    out.print(f"last use: oldest {human_age(s.oldest_use, now)}, newest {human_age(s.newest_use, now)}; "
              f"damaged entries: {s.damaged}; staging leftovers: {s.staging} ({human_size(s.staging_bytes)})",
              highlight=False)


@cache_app.command()
def gc(ctx: typer.Context,
       older_than: Optional[float] = typer.Option(None, "--older-than", metavar="AGE", parser=_option(parse_duration),
                                                  help="Remove entries unused for longer than AGE (90s, 12h, 30d)."),
       max_size: Optional[int] = typer.Option(None, "--max-size", metavar="SIZE", parser=_option(parse_size),
                                              help="Then remove least recently used entries until the store "
                                                   "holds at most SIZE (500M, 10G, 2T; powers of 1024)."),
       dry_run: bool = typer.Option(False, "--dry-run", help="Report what would be removed; remove nothing."),
       store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Remove damaged entries, stale staging leftovers (over an hour old), then old and least recently used entries."""
    try:
        report = _open_store(ctx.obj, store).gc(older_than_s=older_than, max_bytes=max_size, dry_run=dry_run)
    except AnimError as exc:
        raise _fail(exc)
    if as_json:
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
        return
    verb = "would remove" if report.dry_run else "removed"
    if report.removed:
        table = Table(title=f"{verb} from {report.location}")
        for col in ("reason", "count", "size"):
            table.add_column(col, justify="left" if col == "reason" else "right")
        for reason in ("damaged", "staging", "age", "size"):
            items = [i for i in report.removed if i.reason == reason]
            if items:
                table.add_row(reason, str(len(items)), human_size(sum(i.bytes for i in items)))
        out.print(table)
    out.print(f"{verb} {len(report.removed)} item(s), {human_size(report.bytes_freed)}; "
              f"{report.entries_left} entries ({human_size(report.bytes_left)}) remain", highlight=False)
