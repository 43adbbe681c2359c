"""Cost views for people: the per-shot breakdown chart, in script order, in the previz's CJK font."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

from pipeline.models import Ledger

STAGE_ORDER = ("storyboard", "keyframes", "audit", "inbetween", "encode", "assemble")
EPISODE = "(episode)"  # the column of episode-level nodes (assemble, plates, sheets)
# Noto Sans CJK SC (the face the previz draws with) first; DejaVu Sans, matplotlib's own, for
# anything it lacks.
FAMILY = ["Noto Sans CJK SC", "DejaVu Sans"]
STOPPED = {"storyboard": "stopped after the storyboard", "approval": "waiting for storyboard approval",
           "budget": "stopped by the budget", "error": "failed"}


def by_shot_and_stage(ledger: Ledger) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in ledger.records:
        out[r.shot or EPISODE][r.stage] += r.yuan
    return {shot: dict(stages) for shot, stages in out.items()}


def register_cjk_font() -> None:
    """Make the Noto Sans CJK faces the previz ships (``stages.draw.font_path``) known to
    matplotlib; without them a Chinese or Japanese title is drawn as empty boxes. Matplotlib's
    font list is process-wide, so this adds the file once per process."""
    from matplotlib import font_manager

    from stages.draw import font_path

    if any(f.name == FAMILY[0] for f in font_manager.fontManager.ttflist):
        return
    path = font_path()
    if not path.is_file():
        raise FileNotFoundError(f"cost chart: Noto Sans CJK not found at {path} (package manimgx-fonts-cjk)")
    font_manager.fontManager.addfont(str(path))
    # The variable font's default instance is its thinnest weight (100), the only one
    # matplotlib can draw; the chart thickens it with a stroke (see ``cost_chart``), so list the
    # faces as regular rather than have every lookup of a normal weight log a fallback.
    # (addfont has just cleared matplotlib's lookup cache, and nothing looked the faces up since.)
    ttf = font_manager.fontManager.ttflist
    ttf[:] = [dataclasses.replace(f, weight=400) if Path(f.fname) == path else f for f in ttf]


def shot_order(ledger: Ledger, shots: list[str] | None) -> list[str]:
    """The chart's columns: ``shots`` (the plan's script order) first, then any other shot the
    ledger has, then the episode-level nodes."""
    table = by_shot_and_stage(ledger)
    order = list(shots or [])
    order += [s for s in table if s not in order and s != EPISODE]
    return order + ([EPISODE] if EPISODE in table else [])


def cost_chart(ledger: Ledger, path: Path, *, title: str, shots: list[str] | None = None,
               stopped: str | None = None) -> Path:
    """Stacked bars: yuan per shot, split by stage, shots in ``shots`` order (the plan's); a shot
    of the plan the render did not reach has an empty column. A render that stopped early says
    why in the title. Written as PNG."""
    import matplotlib.pyplot as plt

    fig = cost_figure(ledger, title=title, shots=shots, stopped=stopped)
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def cost_figure(ledger: Ledger, *, title: str, shots: list[str] | None = None, stopped: str | None = None):
    """The chart of :func:`cost_chart` as a matplotlib Figure (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patheffects

    register_cjk_font()
    table = by_shot_and_stage(ledger)
    columns = shot_order(ledger, shots)
    stages = [s for s in STAGE_ORDER if any(s in v for v in table.values())]
    stages += sorted({s for v in table.values() for s in v} - set(stages))
    cached = sum(r.cached for r in ledger.records)
    head = f"{title}\n¥{ledger.total_yuan:.5f} ({cached}/{len(ledger.records)} nodes cached)"
    if stopped:
        missing = sum(1 for s in shots or [] if s not in table)
        head += f" — {STOPPED.get(stopped, stopped)}"
        head += f", {missing} shot{'s' * (missing != 1)} not rendered" if missing else ""
    with plt.rc_context({"font.family": FAMILY}):
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(columns) + 2), 4.2), dpi=110)
        bottom = [0.0] * len(columns)
        for stage in stages:
            values = [table.get(s, {}).get(stage, 0.0) for s in columns]
            ax.bar(columns, values, bottom=bottom, label=stage)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_title(head, fontsize=9)
        ax.set_ylabel("¥ (attributed)")
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        if stages:
            ax.legend(fontsize=7, ncols=3)
        # The variable font's default instance is its thinnest weight: a hairline stroke of
        # the text's own colour brings every label to a regular weight.
        for text in fig.findobj(matplotlib.text.Text):
            text.set_path_effects([patheffects.withStroke(linewidth=0.5, foreground=text.get_color())])
        fig.tight_layout()
    return fig
