"""Cost views for people: the per-stage table, the per-shot breakdown chart, run comparisons."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from pipeline.models import Ledger

STAGE_ORDER = ("storyboard", "keyframes", "audit", "inbetween", "encode", "assemble")


def by_shot_and_stage(ledger: Ledger) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in ledger.records:
        out[r.shot or "(episode)"][r.stage] += r.yuan
    return {shot: dict(stages) for shot, stages in out.items()}


def cost_chart(ledger: Ledger, path: Path, *, title: str) -> Path:
    """Stacked bars: yuan per shot, split by stage. Written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = by_shot_and_stage(ledger)
    shots = list(table)
    stages = [s for s in STAGE_ORDER if any(s in v for v in table.values())]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(shots) + 2), 4.0), dpi=110)
    bottom = [0.0] * len(shots)
    for stage in stages:
        values = [table[s].get(stage, 0.0) for s in shots]
        ax.bar(shots, values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    cached = sum(r.cached for r in ledger.records)
    ax.set_title(f"{title}: ¥{ledger.total_yuan:.5f} ({cached}/{len(ledger.records)} nodes cached)")
    ax.set_ylabel("¥ (attributed)")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    ax.legend(fontsize=7, ncols=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
