"""Time against input size for the worst known shapes of script (#11.4): reading and planning
must grow linearly, so each doubling of the input should about double the time (ratio ≈ 2;
the quadratic code this replaced showed 4 and more).

    .venv/bin/python experiments/scaling.py [--repeat 3] [--only emphasis,cues,…]

Each shape is built at 1×, 2×, 4× and 8× (the largest at or under the declared limits where
one applies: 1,000 characters, 10-minute shots, 5,000 shots) and timed end to end as a
producer's ``anim plan`` does it: ``load_episode`` (parse and break down), then ``make_plan``
with the draft profile; the least CPU time of ``--repeat`` runs is printed (``--gc off`` keeps
the garbage collector, whose passes grow with the heap, out of the runs). Nothing here is a
test: the ratios depend on the machine and its load, and tests never assert a time.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.calibration import Calibration  # noqa: E402
from pipeline.config import resolve_profile  # noqa: E402
from pipeline.cost import PriceCatalog  # noqa: E402
from pipeline.plan import make_plan  # noqa: E402
from stages.fountain import strip_emphasis  # noqa: E402
from stages.script import load_episode  # noqa: E402

CALIBRATION = Calibration.load(REPO / "cluster" / "calibration.csv")
PRICES = PriceCatalog.load(REPO / "cluster" / "prices.csv", usd_cny=7.10)
DRAFT = resolve_profile("draft")
SCALES = (1, 2, 4, 8)


def plan(name: str, text: str) -> None:
    episode = load_episode(name, text=text)
    make_plan(episode, DRAFT, calibration=CALIBRATION, prices=PRICES, script_sha256="0" * 64)


def paragraph(unit: str, count: int, per_line: int = 3000) -> str:
    """``unit`` × count as one action paragraph, in lines under the line limit."""
    lines = [unit * per_line] * (count // per_line) + ([unit * (count % per_line)] if count % per_line else [])
    return "INT. A - DAY\n\n" + "\n".join(line.rstrip() for line in lines) + "\n"


# shape: (what the size counts, base size, the work at a size)
SHAPES: dict[str, tuple[str, int, Callable[[int], Callable[[], object]]]] = {
    "emphasis '*a ' (strip_emphasis)": ("units", 60_000, lambda n: lambda: strip_emphasis("*a " * n)),
    "emphasis '_a ' (strip_emphasis)": ("units", 60_000, lambda n: lambda: strip_emphasis("_a " * n)),
    "emphasis '*a ' paragraph (plan)": ("units", 60_000, lambda n: lambda: plan("e.fountain", paragraph("*a ", n))),
    "distinct cues, each mentioned (plan)": ("characters", 125, lambda n: lambda: plan("c.fountain", "INT. A - DAY\n\n" + "".join(
        f"CHAR{k}\nHello there.\n\nThe CHAR{k} waves at everyone.\n\n" for k in range(n)))),
    "CJK cast, each mentioned (plan)": ("characters", 125, lambda n: lambda: plan("z.fountain", "INT. 教室 - 日\n\n" + "".join(
        f"@角色{k}号\n你好。\n\n角色{k}号向大家挥手。\n\n" for k in range(n)))),
    "one dialogue shot of [[shot: Ns]] (plan)": ("seconds", 75, lambda n: lambda: plan("d.fountain", f"INT. A - DAY\n\n[[shot: {n}s]]\n"
                                                                                         "ANA\nHi.\n\nBEN\nHello.\n")),
    "an exchange under one note (plan)": ("dialogue lines", 2500, lambda n: lambda: plan("x.fountain", "INT. A - DAY\n\n[[shot: 600s]]\n" + "".join(
        f"{'ANA' if k % 2 else 'BEN'}\nLine {k}.\n\n" for k in range(n)))),
    "action shots of 1 s (plan)": ("shots", 625, lambda n: lambda: plan("s.fountain", "INT. A - DAY\n\n" + "".join(
        f"[[shot: 1s]]\nAna crosses the room, step {k}.\n\n" for k in range(n)))),
    "lines of 9,000 '(' / blanks (plan)": ("lines", 25, lambda n: lambda: plan("h.fountain", "".join(
        f"INT. ROOM {k}{' ' * 450}#{k}#\n\nBOB{'(' * 9000}\nHi.\n\n@ANA (V.O.){' ' * 9000}x\nHo.\n\n" for k in range(n)))),
    "YAML shot list (plan)": ("shots", 625, lambda n: lambda: plan("y.yaml", "title: T\nscenes:\n  - heading: EXT. HARBOUR - DUSK\n    shots:\n"
                                                                   + "".join(f"      - {{duration: 1.0, camera: wide, action: Shot {k}}}\n"
                                                                             for k in range(n)))),
}


def best_of(work: Callable[[], object], repeat: int, collector: bool) -> float:
    """CPU seconds of this process (other processes on a shared machine leave them alone, unlike
    wall time): the least of at least ``repeat`` runs, and of as many as half a second allows
    (small sizes take milliseconds). The garbage of one run is collected before the next;
    ``collector=False`` also keeps the collector out of the run (its passes grow with the heap)."""
    times: list[float] = []
    while len(times) < repeat or sum(times) < 0.5 and len(times) < 50:
        gc.collect()
        if not collector:
            gc.disable()
        start = time.process_time()
        try:
            work()
        finally:
            times.append(time.process_time() - start)
            gc.enable()
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per size; the best is printed")
    parser.add_argument("--only", default="", help="comma-separated words a shape's name must contain")
    parser.add_argument("--gc", choices=("on", "off"), default="on", help="the garbage collector during a run")
    args = parser.parse_args()
    words = [w.strip().lower() for w in args.only.split(",") if w.strip()]
    print(f"{'shape':42} {'size':>20} {'cpu s':>8} {'× per doubling':>15}")
    for name, (unit, base, make) in SHAPES.items():
        if words and not any(w in name.lower() for w in words):
            continue
        previous = None
        for scale in SCALES:
            size = base * scale
            seconds = best_of(make(size), args.repeat, args.gc == "on")
            ratio = f"{seconds / previous:.2f}" if previous else "—"
            print(f"{name:42} {f'{size:,} {unit}':>20} {seconds:8.3f} {ratio:>15}", flush=True)
            previous = seconds
        print()


if __name__ == "__main__":
    main()
