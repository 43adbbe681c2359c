"""RIFE on an accelerator: the same ``RifeInterpolator`` code with ``device="cuda"``, checked
against the CPU result on the shared triplets and timed per frame.

1. Quality: every consecutive PNG triple of ``frames/`` (Sintel raft and alley, the three
   Big Buck Bunny triplets: the set the weights' README quotes 31.5 dB on), t = 0.5, PSNR
   (RGB) on the CPU and on the device, and the largest pixel difference between the two.
2. Speed on the device: ms per in-between at native size and at 1920x1080 (median of
   ``--repeats`` after a warm-up, synchronised; the upload of both keyframes and the download
   of the result included, as in a render), with the default fp32 (TF32 matmuls allowed by
   torch's defaults only).
3. A calibration row for ``inbetween,rife,gpu:<name>`` (seconds per in-between per
   megapixel at 1080p) is printed and written to ``--out``.

    python experiments/rife_device.py --weights ../shared/data/weights/rife/flownet.pkl \
        --frames ../shared/data/frames [--out rife_gpu.csv]

Needs only torch, numpy, OpenCV and pydantic: it runs on a bare GPU machine.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from datetime import date
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.rife import RifeInterpolator  # noqa: E402

HD = (1920, 1080)


def _png(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def png_triplets(frames: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every consecutive PNG triple under ``frames`` (one folder level, and bbb/triplet_f*)."""
    out = {}
    for d in sorted([p for p in frames.iterdir() if p.is_dir()] + sorted(frames.glob("*/triplet_f*"))):
        pngs = sorted(d.glob("*.png"))
        for i in range(1, len(pngs) - 1):
            out[f"{d.relative_to(frames)}/{pngs[i].stem[-4:]}"] = tuple(_png(p) for p in pngs[i - 1:i + 2])
    return out


def timed(fn, a: np.ndarray, b: np.ndarray, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn(a, b, [0.5])`` after one warm-up, synchronised on the device."""
    fn(a, b, [0.5])
    runs = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn(a, b, [0.5])  # ends with .cpu(): the result is on the host when it returns
        runs.append(time.perf_counter() - t0)
    return float(np.median(runs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--frames", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, help="CSV for the calibration row")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("rife_device: no CUDA device; nothing measured")
        return 2
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    # 1. Quality on both devices, and their difference.
    cpu = RifeInterpolator(weights=args.weights, device="cpu")
    dev = RifeInterpolator(weights=args.weights, device=args.device)
    trip = png_triplets(args.frames)
    rows, p_cpu, p_dev = [], [], []
    for key, (a, mid, b) in trip.items():
        (y_cpu,), (y_dev,) = cpu(a, b, [0.5]), dev(a, b, [0.5])
        p_cpu.append(cv2.PSNR(y_cpu, mid))
        p_dev.append(cv2.PSNR(y_dev, mid))
        diff = int(cv2.absdiff(y_cpu, y_dev).max())
        rows.append(f"{key:28s} {a.shape[1]:>5d}x{a.shape[0]:<4d} cpu {p_cpu[-1]:6.2f} dB  {name} {p_dev[-1]:6.2f} dB  "
                    f"max |cpu-{device.type}| {diff}")
    print("\n".join(rows))
    print(f"mean over {len(trip)} triplets: cpu {np.mean(p_cpu):.2f} dB, {name} {np.mean(p_dev):.2f} dB")

    # 2. Speed on the device: native sizes, then 1080p.
    sizes = {}
    for key, (a, _, b) in list(trip.items()):
        sizes.setdefault(a.shape[:2], (a, b))
    for (h, w), (a, b) in sizes.items():
        s = timed(dev, a, b, device, args.repeats)
        print(f"{name} {w}x{h}: {1000 * s:.1f} ms per in-between")
    a, _, b = next(iter(trip.values()))
    a_hd, b_hd = (cv2.resize(x, HD, interpolation=cv2.INTER_CUBIC) for x in (a, b))
    s_hd = timed(dev, a_hd, b_hd, device, args.repeats)
    mpx = HD[0] * HD[1] / 1e6
    print(f"{name} 1920x1080: {1000 * s_hd:.1f} ms per in-between ({s_hd / mpx:.5f} s/Mpx)")

    # 3. The calibration row.
    resource = "gpu:" + name.replace("NVIDIA", "").strip().split()[0] if device.type == "cuda" else "cpu"
    row = dict(stage="inbetween", backend="rife", device=resource, unit="inbetween", overhead_s=0.0,
               seconds_per_unit_mpx=round(s_hd / mpx, 6),
               source=f"measured on {name}: experiments/rife_device.py, 1920x1080, fp32, median of {args.repeats}, "
                      f"host-device copies included; quality {np.mean(p_dev):.2f} dB vs cpu {np.mean(p_cpu):.2f} dB "
                      f"on {len(trip)} shared triplets",
               measured_at=date.today().isoformat())
    print(row)
    if args.out:
        with args.out.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            writer.writeheader()
            writer.writerow(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
