"""RIFE in-betweening: our own torch implementation of the RIFE 4.x IFNet (Practical-RIFE lineage).

The architecture is fixed by the published state dict (``flownet.pkl``), key by key:

* ``encode`` (``Head``): a feature head, ``cnn0`` 3→16 (3×3, stride 2), ``cnn1``/``cnn2`` 16→16,
  ``cnn3`` a transposed 4×4 conv 16→4 back to full resolution; LeakyReLU(0.2) between them.
  Each keyframe gets 4 feature channels.
* ``block0``…``block4`` (``IFBlock``), widths 192, 128, 96, 64, 32: ``conv0`` two stride-2 3×3
  convs (in→c/2→c), eight ``ResConv`` (3×3 conv × learned per-channel ``beta`` + skip, LeakyReLU),
  ``lastconv`` a transposed 4×4 stride-2 conv to 52 = 4×13 channels and PixelShuffle(2): 13
  channels at half the block's input resolution, upsampled to full: flow t→0 and t→1 (4), a
  blend-mask logit (1) and 8 feature channels handed to the next block.
* ``block0`` sees 15 channels: both images (3+3), both feature maps (4+4), the time plane (1).
  Blocks 1–4 see 28: both images and feature maps warped by the current flow (3+3+4+4), time
  (1), mask logit (1), the previous block's 8 features, and the current flow (4); they add a
  flow residual and replace the mask.
* Scales 16, 8, 4, 2, 1 (one per block, divided by ``scale``): a block works at 1/s of the
  input and halves it twice more, so inputs are padded to a multiple of 64 / ``scale`` (64 at
  ``scale`` ≥ 1, 128 at 0.5: before 2026-12-03 only 64, and 0.5 failed on a side not a multiple
  of 128, 360 among them). The result is both keyframes backward-warped
  (``grid_sample``, bilinear, border) by the final flows and blended by ``sigmoid(mask)``.

``teacher.*`` and ``caltime.*`` keys are training-only and are dropped on load.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.records import StageError

WIDTHS = (192, 128, 96, 64, 32)  # channels of block0…block4
SCALES = (16, 8, 4, 2, 1)  # working scale of block0…block4 at scale=1.0
PAD = 64


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2, True))


class ResConv(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones((1, c, 1, 1)))
        self.relu = nn.LeakyReLU(0.2, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x) * self.beta + x)


class IFBlock(nn.Module):
    def __init__(self, cin: int, c: int):
        super().__init__()
        self.conv0 = nn.Sequential(_conv(cin, c // 2, 2), _conv(c // 2, c, 2))
        self.convblock = nn.Sequential(*(ResConv(c) for _ in range(8)))
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(c, 4 * 13, 4, 2, 1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor, flow: torch.Tensor | None, scale: float):
        x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear", align_corners=False)
        if flow is not None:
            flow = F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear", align_corners=False) / scale
            x = torch.cat((x, flow), 1)
        out = self.lastconv(self.convblock(self.conv0(x)))
        out = F.interpolate(out, scale_factor=scale, mode="bilinear", align_corners=False)
        return out[:, :4] * scale, out[:, 4:5], out[:, 5:]


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.cnn0 = nn.Conv2d(3, 16, 3, 2, 1)
        self.cnn1 = nn.Conv2d(16, 16, 3, 1, 1)
        self.cnn2 = nn.Conv2d(16, 16, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(16, 4, 4, 2, 1)
        self.relu = nn.LeakyReLU(0.2, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.cnn0(x))
        x = self.relu(self.cnn1(x))
        x = self.relu(self.cnn2(x))
        return self.cnn3(x)


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: out(x) = image(x + flow(x)), bilinear, border replicated."""
    n, _, h, w = flow.shape
    ys, xs = torch.meshgrid(
        torch.linspace(-1.0, 1.0, h, device=flow.device), torch.linspace(-1.0, 1.0, w, device=flow.device),
        indexing="ij",
    )
    gx = xs + flow[:, 0] * (2.0 / (w - 1.0))
    gy = ys + flow[:, 1] * (2.0 / (h - 1.0))
    grid = torch.stack((gx, gy), -1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


class IFNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block0 = IFBlock(3 + 3 + 4 + 4 + 1, WIDTHS[0])
        self.block1 = IFBlock(28, WIDTHS[1])
        self.block2 = IFBlock(28, WIDTHS[2])
        self.block3 = IFBlock(28, WIDTHS[3])
        self.block4 = IFBlock(28, WIDTHS[4])
        self.encode = Head()

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, t: float, scales: tuple[float, ...]) -> torch.Tensor:
        """The in-between at ``t``: both keyframes warped by the flows from ``t`` and blended by the mask."""
        flow, mask = self.flows(img0, img1, t, scales)
        return blend(img0, img1, flow, mask)

    def flows(self, img0: torch.Tensor, img1: torch.Tensor, t: float,
              scales: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flows from time ``t`` to each keyframe (N×4: t→0, t→1) and the blend-mask logit (N×1)."""
        # 1. Features of both keyframes and the time plane.
        f0, f1 = self.encode(img0), self.encode(img1)
        time = img0[:, :1] * 0 + t
        # 2. Coarse-to-fine: block0 estimates flow from scratch, the others refine it.
        flow, mask, feat = self.block0(torch.cat((img0, img1, f0, f1, time), 1), None, scales[0])
        w0, w1 = warp(img0, flow[:, :2]), warp(img1, flow[:, 2:])
        for block, s in zip((self.block1, self.block2, self.block3, self.block4), scales[1:]):
            x = torch.cat((w0, w1, warp(f0, flow[:, :2]), warp(f1, flow[:, 2:]), time, mask, feat), 1)
            dflow, mask, feat = block(x, flow, s)
            flow = flow + dflow
            w0, w1 = warp(img0, flow[:, :2]), warp(img1, flow[:, 2:])
        return flow, mask


def blend(img0: torch.Tensor, img1: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Both keyframes backward-warped by ``flow`` (t→0, t→1), blended by the learned soft occlusion mask."""
    m = torch.sigmoid(mask)
    return warp(img0, flow[:, :2]) * m + warp(img1, flow[:, 2:]) * (1 - m)


def retime(flow: torch.Tensor, mask: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The flows and mask logit of time 0.5 moved to ``t`` under linear motion: the flow to keyframe 0 scaled by
    ``2t``, to keyframe 1 by ``2(1 - t)`` (each read at the target pixel, as the flow in-betweener does), and the
    mask's logit shifted by the log-odds of temporal closeness, ln((1 - t) / t) (0 at t = 0.5)."""
    scaled = torch.cat((flow[:, :2] * (2.0 * t), flow[:, 2:] * (2.0 * (1.0 - t))), 1)
    return scaled, mask + math.log((1.0 - t) / t)


class RifeInterpolator:
    """RIFE 4.x in-betweening with published weights; same call contract as ``FlowInterpolator``.

    Args:
        weights: path to a RIFE 4.x ``flownet.pkl`` state dict (5 blocks + ``encode`` head).
        device: torch device, "cpu" or "cuda"; the code path is the same.
        scale: 1.0 for frames up to ~1080p; 0.5 estimates flow at half the usual resolution
            (Practical-RIFE's advice for 4K). On the ten shared triplets (1024×436, 1280×720) 0.5
            costs 0.0–2.6 dB against 1.0 and 2.0 gains up to 1.0 dB on Sintel (4× the work);
            at 640×360 (bbb, padded to 640×384 vs 640×512) 0.5 saved a fifth of the CPU time and
            cost 4–8 dB (the head and the full-size warps remain; the padding grows).
        threads: torch intra-op threads on the CPU; ``None`` leaves torch's default.
        passes: "per_time" (RIFE as published: one network pass per in-between) or "one": one pass
            per keyframe pair, at t = 0.5, whose flows and mask give every other in-between of the
            pair (``retime``: linear motion, the mask shifted toward the nearer keyframe), so that a
            pair's k in-betweens cost about one pass instead of k. At t = 0.5 it is RIFE exactly;
            elsewhere it is an approximation, measured in experiments/interp_bench.py on the sets'
            wide-step pairs, where every in-between has a true frame.
    """

    name = "rife"
    PASSES = ("per_time", "one")

    def __init__(self, *, weights: str | Path, device: str = "cpu", scale: float = 1.0, threads: int | None = None,
                 passes: str = "per_time"):
        if scale not in (0.25, 0.5, 1.0, 2.0, 4.0):
            raise ValueError(f"scale={scale}: RIFE supports 0.25, 0.5, 1.0, 2.0 or 4.0")
        if passes not in self.PASSES:
            raise ValueError(f"passes={passes!r}: known are {', '.join(self.PASSES)}")
        self.passes = passes
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads={threads}: must be >= 1")
            torch.set_num_threads(threads)
        self.device, self.scale = torch.device(device), scale
        self.scales = tuple(s / scale for s in SCALES)
        # the coarsest block works at 16/scale and halves twice more: the input's sides must divide by 64/scale
        self.pad = round(PAD / min(scale, 1.0))
        self.net = IFNet().eval().to(self.device)
        self.net.load_state_dict(_load_state(Path(weights), self.net, self.device))

    def __call__(self, a: np.ndarray, b: np.ndarray, ts: list[float]) -> list[np.ndarray]:
        _check_pair(a, b, ts)
        if np.array_equal(a, b):  # a hold: nothing moves, no net to run
            return [a.copy() for _ in ts]
        h, w = a.shape[:2]
        ph, pw = -h % self.pad, -w % self.pad
        with torch.inference_mode():
            # 1. uint8 HWC → float NCHW in [0, 1], padded to a multiple of 64.
            x0, x1 = (
                F.pad(torch.from_numpy(img).to(self.device).permute(2, 0, 1)[None].float() / 255.0, (0, pw, 0, ph))
                for img in (a, b)
            )
            # 2. One forward pass per time (or one at t = 0.5, retimed); crop, back to uint8 HWC.
            mid = self.net.flows(x0, x1, 0.5, self.scales) if self.passes == "one" else None
            out = []
            for t in ts:
                if mid is None:
                    y = self.net(x0, x1, float(t), self.scales)
                else:
                    y = blend(x0, x1, *retime(*mid, float(t)))
                y = y[0, :, :h, :w]
                out.append((y * 255.0).round_().clamp_(0, 255).byte().permute(1, 2, 0).contiguous().cpu().numpy())
        return out


def _check_pair(a: np.ndarray, b: np.ndarray, ts: list[float]) -> None:
    """The in-betweeners' input contract (``stages/inbetween.py`` checks the same; a stage does not
    import another stage)."""
    if a.shape != b.shape or a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"interpolate needs two RGB uint8 images of equal shape, got {a.shape} {a.dtype} "
                         f"and {b.shape} {b.dtype}")
    bad = [t for t in ts if not 0.0 < t < 1.0]
    if bad:
        raise ValueError(f"interpolation times must lie strictly between 0 and 1, got {bad}")


def _load_state(path: Path, net: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """Read a RIFE 4.x state dict and check it fits ``net`` exactly, naming what does not."""
    if not path.is_file():
        raise StageError(
            "inbetween", None,
            f"RIFE weights not found at {path}: expected a RIFE 4.x flownet.pkl state dict "
            "(block0…block4 and encode, Practical-RIFE lineage)",
        )
    try:
        raw = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a state dict"
        # torch's own text runs to a dozen lines; the chained cause keeps it (--debug prints it)
        raise StageError("inbetween", None, f"{path} is not a loadable torch state dict "
                         f"({type(e).__name__}: {str(e).strip().split('. ')[0].splitlines()[0] if str(e).strip() else ''})") from e
    if not isinstance(raw, dict):
        raise StageError("inbetween", None, f"{path} holds a {type(raw).__name__}, expected a RIFE 4.x state dict")
    state = {
        k.removeprefix("module."): v for k, v in raw.items()
        if not k.removeprefix("module.").startswith(("teacher.", "caltime."))
    }
    want = net.state_dict()
    # shape mismatches first: they say most about which architecture the file is for
    problems = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in want.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems += [f"missing {k} {tuple(v.shape)}" for k, v in want.items() if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in want]
    if problems:
        raise StageError(
            "inbetween", None,
            f"{path} does not fit the RIFE 4.x IFNet ({len(problems)} mismatches): " + "; ".join(problems[:6]),
        )
    return state
