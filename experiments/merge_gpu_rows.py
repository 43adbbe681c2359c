"""Fold a GPU session's measurements into the calibration table the planner prices from.

``experiments/calibrate_gpu.py`` writes one detailed row per (model, steps, batch, size) to
``cluster/calibration_gpu.csv``. The planner keys keyframe rows by (family, steps, GPU), so for
each (model, steps) this writes one ``keyframes,diffusers:<model>:s<steps>,gpu:<GPU>`` row into
``cluster/calibration.csv``:

* at the largest measured batch up to 8 denoiser samples per call (what the shipped GPU
  profiles batch: a few-step model at ``batch_size = 8``, a base model with classifier-free
  guidance at ``batch_size = 4``, i.e. 8 samples);
* few-step rows (steps <= 8) assume no classifier-free guidance, as distilled models run;
  base-model rows (steps >= 20) assume guidance: two denoiser samples per image;
* seconds per image = (steps x samples per image x step time + decode) / batch, per megapixel,
  the median over the measured sizes (16:9 and 9:16).

A RIFE row from ``experiments/rife_device.py`` is appended as it is. Rows already in the table
with the same (stage, backend, device) are replaced; the published rows of other GPUs stay.

    .venv/bin/python experiments/merge_gpu_rows.py cluster/calibration_gpu.csv [rife_gpu.csv]
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.calibration import Calibration, CalibrationRow  # noqa: E402

MAX_SAMPLES = 8
FEW_STEPS = 8


def keyframe_rows(detail: list[dict]) -> list[CalibrationRow]:
    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for r in detail:
        groups[(r["model"], r["device"], int(r["steps"]))].append(r)
    out = []
    for (model, device, steps), rows in sorted(groups.items()):
        batch = max(b for b in {int(r["batch"]) for r in rows} if b <= MAX_SAMPLES)
        cfg = 1 if steps <= FEW_STEPS else 2
        at = [r for r in rows if int(r["batch"]) == batch]
        images = batch // cfg  # images per denoiser call
        per_mpx = []
        for r in at:
            call_s = (steps * float(r["step_ms_eager"]) + float(r["decode_ms"]) * images / batch) / 1000
            per_mpx.append(call_s / images / (int(r["width"]) * int(r["height"]) / 1e6))
        one = [r for r in rows if int(r["batch"]) == 1]
        b1 = statistics.median((steps * cfg * float(r["step_ms_eager"]) + float(r["decode_ms"])) / 1000
                               / (int(r["width"]) * int(r["height"]) / 1e6) for r in one) if one else float("nan")
        graph = [float(r["step_ms_graph"]) for r in one if r["step_ms_graph"] not in ("", "nan")]
        eager = [float(r["step_ms_eager"]) for r in one]
        host = (f"; at batch 1 a step is {statistics.median(eager):.0f} ms eager vs {statistics.median(graph):.0f} ms "
                "replayed as a CUDA graph (host-bound)") if graph else ""
        sizes = ", ".join(sorted({f"{r['width']}x{r['height']}" for r in at}))
        src = rows[0]["source"]
        out.append(CalibrationRow(
            stage="keyframes", backend=f"diffusers:{model}:s{steps}", device=device, unit="keyframe", overhead_s=0.0,
            seconds_per_unit_mpx=round(statistics.median(per_mpx), 6),
            source=(f"{src}: real {model} denoiser + VAE at real size, eager PyTorch, {batch} denoiser samples per call "
                    f"({'no guidance' if cfg == 1 else 'classifier-free guidance: 2 samples per image'}), VAE decode "
                    f"included, median over {sizes}; text encoding excluded. Batch 1 would cost {b1:.3f} s/Mpx{host}. "
                    "Confidence: medium (compute time measured; weights random)"),
            measured_at=rows[0]["measured_at"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("detail", type=Path, help="calibrate_gpu.py output")
    ap.add_argument("extra", type=Path, nargs="*", help="rows in the calibration table's own columns (rife_device.py)")
    ap.add_argument("--table", type=Path, default=REPO / "cluster" / "calibration.csv")
    args = ap.parse_args(argv)
    with args.detail.open(newline="", encoding="utf-8") as fh:
        rows = keyframe_rows(list(csv.DictReader(fh)))
    for path in args.extra:
        with path.open(newline="", encoding="utf-8") as fh:
            rows += [CalibrationRow(**r) for r in csv.DictReader(fh)]
    table = Calibration.load(args.table)
    table.write(rows)
    for r in rows:
        print(f"{r.stage},{r.backend},{r.device}: {r.seconds_per_unit_mpx:g} s/(unit*Mpx)")
    print(f"wrote {len(rows)} rows into {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
