"""The cost chart: Chinese titles in the previz's Noto Sans CJK, shots in script order."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from PIL import Image

from .conftest import REPO


@pytest.fixture(scope="module")
def plan():
    from pipeline.calibration import Calibration
    from pipeline.config import resolve_profile
    from pipeline.cost import PriceCatalog
    from pipeline.plan import make_plan
    from stages.script import load_episode

    return make_plan(load_episode(REPO / "examples" / "episode_zh.fountain"), resolve_profile("draft"),
                     calibration=Calibration.load(REPO / "cluster" / "calibration.csv"),
                     prices=PriceCatalog.load(REPO / "cluster" / "prices.csv", usd_cny=7.1), script_sha256="0" * 64)


def finished_backwards(plan, *, upto: int | None = None):
    """A ledger whose rows arrive last shot first (the order nodes finish in is not the script's)."""
    from pipeline.models import Ledger, LedgerRecord

    shots = plan.shots[:upto] if upto else plan.shots
    rows = [LedgerRecord(stage=stage, shot=s.shot.id, seconds=1.0, resource="cpu", units=1.0, yuan=0.001 * (i + 1))
            for i, s in reversed(list(enumerate(shots))) for stage in ("keyframes", "storyboard", "inbetween")]
    return Ledger(records=rows + [LedgerRecord(stage="assemble", shot=None, seconds=1.0, resource="cpu", units=1.0,
                                               yuan=0.002)])


def test_a_chinese_title_draws_every_glyph_and_shots_keep_script_order(tmp_path, plan):
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    from pipeline.report import cost_chart, cost_figure
    from stages.draw import font_path

    assert any("\u4e00" <= ch <= "\u9fff" for ch in plan.title)  # the sample's title is Chinese
    order = [s.shot.id for s in plan.shots]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = cost_figure(finished_backwards(plan), title=plan.title, shots=order)
        fig.savefig(tmp_path / "chart.png")  # glyphs are looked up when the text is drawn
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_xticklabels()]
        title = ax.title
        plt.close(fig)
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert missing == []
    assert labels == order + ["(episode)"]
    assert plan.title in title.get_text()
    assert Path(font_manager.findfont(title.get_fontproperties())) == font_path()
    # The file cost_chart writes is that chart.
    path = cost_chart(finished_backwards(plan), tmp_path / "cost_chart.png", title=plan.title, shots=order)
    assert Image.open(path).size == Image.open(tmp_path / "chart.png").size


def test_a_stopped_render_is_labelled_and_keeps_a_column_for_every_shot(plan):
    import matplotlib.pyplot as plt

    from pipeline.report import cost_figure

    order = [s.shot.id for s in plan.shots]
    fig = cost_figure(finished_backwards(plan, upto=3), title=plan.title, shots=order, stopped="budget")
    ax = fig.axes[0]
    labels, title = [t.get_text() for t in ax.get_xticklabels()], ax.title.get_text()
    heights = {}
    for bar, label in zip(ax.patches, labels * len(ax.containers)):
        heights[label] = heights.get(label, 0.0) + bar.get_height()
    plt.close(fig)
    assert labels == order + ["(episode)"]
    assert "stopped by the budget" in title and f"{len(order) - 3} shots not rendered" in title
    assert all(heights[s] > 0 for s in order[:3]) and all(heights[s] == 0 for s in order[3:])
