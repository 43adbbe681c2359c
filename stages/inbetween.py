"""In-betweening: the drawings between two keyframes, and the full frame stream of one shot.

Three interpolators share one call signature, ``interpolate(a, b, ts) -> list[image]``:

* ``FlowInterpolator`` ("flow", the default): OpenCV DIS optical flow computed once per
  keyframe pair in both directions, bidirectional backward warping of both neighbours to
  each time ``t``, blended by temporal distance; samples from outside a keyframe (frame-edge
  occlusion) defer to the other keyframe.
* ``Crossfade`` ("crossfade"): the linear blend baseline every quality figure is compared to.
* ``RifeInterpolator`` ("rife", ``stages/rife.py``): RIFE 4.x with published weights (torch,
  CPU or GPU); needs ``weights=``. Registered through a factory so torch is imported only
  when it is built.

Add a backend by writing a class with ``name`` and ``__call__`` and registering it in
``INTERPOLATORS``. ``shot_frames`` turns one shot's keyframes into exactly ``frames`` RGB
frames, streaming: memory is bounded by one keyframe pair's in-betweens.
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterator

import cv2
import numpy as np

from pipeline.models import Keyframes

VERSION = "2"

# Weight of a sample taken from outside a keyframe (motion across the frame edge): the
# replicated border is not what is there, so the other keyframe decides (+0.1 dB on bbb/120).
OUTSIDE_WEIGHT = 1e-3

Interpolate = Callable[[np.ndarray, np.ndarray, list[float]], list[np.ndarray]]


def check_pair(a: np.ndarray, b: np.ndarray, ts: list[float]) -> None:
    if a.shape != b.shape or a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(
            f"interpolate needs two RGB uint8 images of equal shape, got {a.shape} {a.dtype} "
            f"and {b.shape} {b.dtype}"
        )
    bad = [t for t in ts if not 0.0 < t < 1.0]
    if bad:
        raise ValueError(f"interpolation times must lie strictly between 0 and 1, got {bad}")


class Crossfade:
    """Linear blend ``(1 - t) * a + t * b``: the baseline, no motion model at all."""

    name = "crossfade"

    def __call__(self, a: np.ndarray, b: np.ndarray, ts: list[float]) -> list[np.ndarray]:
        check_pair(a, b, ts)
        return [cv2.addWeighted(a, 1.0 - t, b, t, 0.0) for t in ts]


class FlowInterpolator:
    """Bidirectional optical-flow interpolation (OpenCV DIS, CPU), aware of frame-edge occlusion.

    Args:
        preset: "ultrafast", "fast" (OpenCV's FAST settings) or "medium" (the default): the
            flow refined one pyramid level finer (half resolution), which is what lifts fine
            texture and hair (+0.15 dB mean PSNR on the shared triplets, ~1.6x the time; it
            matches RIFE there). See ``DIS_SETTINGS``.
        flow_scale: flow is computed on images resized by this factor and upsampled; ``None``
            picks ``min(1, max_flow_side / long side)``.
        max_flow_side: long side of the flow images when ``flow_scale`` is ``None``; the
            default keeps 1080p at full resolution.

    Everything after the two DIS ``calc`` calls is a handful of full-frame OpenCV passes
    (fixed-point remaps, one weighted blend), so at 1080p the flow itself is most of the time.
    A per-pixel forward-backward consistency weight (version 1) was measured and dropped: it
    moved mean PSNR on the shared triplets by 0.00 dB and cost a quarter of the frame time.
    """

    name = "flow"
    # (finest scale, patch size, patch stride, gradient descent iterations, variational
    # refinement iterations), measured on the shared triplets (experiments/interp_bench.py):
    # ultrafast and fast are OpenCV's presets (30.31 / 30.38 dB); medium = fast one pyramid
    # level finer (30.53 dB). OpenCV's own MEDIUM (1, 8, 3, 25, 5) adds 0.01 dB for 1.3x more.
    DIS_SETTINGS = {
        "ultrafast": (2, 8, 4, 12, 0),
        "fast": (2, 8, 4, 16, 5),
        "medium": (1, 8, 4, 16, 5),
    }

    def __init__(self, *, preset: str = "medium", flow_scale: float | None = None, max_flow_side: int = 2048):
        if preset not in self.DIS_SETTINGS:
            raise ValueError(f"preset={preset!r}: known DIS presets are {sorted(self.DIS_SETTINGS)}")
        if flow_scale is not None and not 0.0 < flow_scale <= 1.0:
            raise ValueError(f"flow_scale={flow_scale}: must be in (0, 1]")
        if max_flow_side < 16:
            raise ValueError(f"max_flow_side={max_flow_side}: must be at least 16")
        self.preset, self.flow_scale, self.max_flow_side = preset, flow_scale, max_flow_side
        self._dis = _dis(*self.DIS_SETTINGS[preset])
        self._grid: np.ndarray | None = None  # pixel coordinates, rebuilt when the size changes
        self._ones: np.ndarray | None = None

    def __call__(self, a: np.ndarray, b: np.ndarray, ts: list[float]) -> list[np.ndarray]:
        check_pair(a, b, ts)
        if np.array_equal(a, b):  # a hold: nothing moves, no flow to compute
            return [a.copy() for _ in ts]

        # 1. Flow a→b and b→a, once for the pair, on grayscale (possibly downscaled).
        f01, f10 = self.flows(a, b)
        grid, ones = self._pixel_grid(*a.shape[:2])

        # 2. Per time t: approximate the flow from t back to each keyframe with the flow at the
        #    target pixel (linear motion, Super-SloMo style: both flows vote), warp both
        #    neighbours backward and blend by temporal closeness. A sample from outside a
        #    keyframe (motion across the frame edge) carries almost no weight: the replicated
        #    border is not what is there, so the other keyframe decides.
        out = []
        for t in ts:
            map0 = cv2.add(cv2.addWeighted(f01, -(1.0 - t) * t, f10, t * t, 0.0), grid)
            map1 = cv2.add(cv2.addWeighted(f01, (1.0 - t) ** 2, f10, -t * (1.0 - t), 0.0), grid)
            # fixed-point maps: one conversion each, then fast remaps of image and weight
            map0 = cv2.convertMaps(map0, None, cv2.CV_16SC2)
            map1 = cv2.convertMaps(map1, None, cv2.CV_16SC2)
            w0 = _warp(ones, *map0, border=OUTSIDE_WEIGHT)
            w1 = _warp(ones, *map1, border=OUTSIDE_WEIGHT)
            cv2.multiply(w0, 1.0 - t, dst=w0)
            cv2.multiply(w1, t, dst=w1)
            # (w0 * a_t + w1 * b_t) / (w0 + w1), per pixel
            out.append(cv2.blendLinear(_warp(a, *map0), _warp(b, *map1), w0, w1))
        return out

    def flows(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """DIS flow a→b and b→a at full resolution (float32, HxWx2, pixels)."""
        h, w = a.shape[:2]
        scale = self.flow_scale if self.flow_scale is not None else min(1.0, self.max_flow_side / max(h, w))
        ga, gb = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            size = (max(8, round(w * scale)), max(8, round(h * scale)))
            ga = cv2.resize(ga, size, interpolation=cv2.INTER_AREA)
            gb = cv2.resize(gb, size, interpolation=cv2.INTER_AREA)
        f01 = self._dis.calc(ga, gb, None)
        f10 = self._dis.calc(gb, ga, None)
        if scale < 1.0:
            sx, sy = w / ga.shape[1], h / ga.shape[0]
            f01, f10 = (
                cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR) * np.float32([sx, sy])
                for f in (f01, f10)
            )
        return f01, f10

    def _pixel_grid(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        if self._grid is None or self._grid.shape[:2] != (h, w):
            xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
            self._grid, self._ones = cv2.merge([xs, ys]), np.ones((h, w), np.float32)
        return self._grid, self._ones


def _dis(finest_scale: int, patch: int, stride: int, descent: int, refine: int) -> cv2.DISOpticalFlow:
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    dis.setFinestScale(finest_scale)
    dis.setPatchSize(patch)
    dis.setPatchStride(stride)
    dis.setGradientDescentIterations(descent)
    dis.setVariationalRefinementIterations(refine)
    return dis


def _warp(
    image: np.ndarray, coords: np.ndarray, fraction: np.ndarray | None = None, border: float | None = None
) -> np.ndarray:
    """Backward warp: out(x) = image(coords(x)), bilinear; edges replicated, or ``border`` outside."""
    if border is None:
        return cv2.remap(image, coords, fraction, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return cv2.remap(image, coords, fraction, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=border)


def _rife(**kwargs) -> Interpolate:
    """RIFE 4.x (``stages/rife.py``); imported on use so that torch loads only when asked for."""
    from stages.rife import RifeInterpolator

    return RifeInterpolator(**kwargs)


INTERPOLATORS: dict[str, Callable[..., Interpolate]] = {
    FlowInterpolator.name: FlowInterpolator,
    Crossfade.name: Crossfade,
    "rife": _rife,
}


def interpolator(name: str, **kwargs) -> Interpolate:
    """Build the interpolator registered under ``name`` with its keyword arguments."""
    try:
        cls = INTERPOLATORS[name]
    except KeyError:
        raise ValueError(f"unknown interpolator {name!r}; known: {sorted(INTERPOLATORS)}") from None
    return cls(**kwargs)


def shot_frames(
    keyframes: Keyframes, *, frames: int, drawings: list[int], interpolate: Interpolate
) -> Iterator[np.ndarray]:
    """Yield exactly ``frames`` RGB uint8 images of one shot, in order, as soon as each is ready.

    Every frame from a drawing start up to the next repeats that drawing (the same array
    object is yielded again). A drawing at a keyframe is the keyframe image; a drawing
    between keyframes k0 < d < k1 is interpolated at t = (d - k0) / (k1 - k0), all drawings of
    one pair in a single ``interpolate`` call; drawings after the last keyframe hold it.
    Only one keyframe pair's in-betweens are held in memory at a time.
    """
    keys = [f.index for f in keyframes.frames]
    _check_shot(keyframes, keys, frames, drawings)
    images = {f.index: f.image for f in keyframes.frames}
    return _stream(keys, images, frames, drawings, interpolate)


def _stream(keys, images, frames, drawings, interpolate) -> Iterator[np.ndarray]:
    pair: tuple[int, int] | None = None
    inbetweens: dict[int, np.ndarray] = {}
    ends = drawings[1:] + [frames]
    for d, end in zip(drawings, ends):
        if d in images:
            image = images[d]
        elif d > keys[-1]:
            image = images[keys[-1]]
        else:
            i = bisect_right(keys, d)
            k0, k1 = keys[i - 1], keys[i]
            if pair != (k0, k1):  # first drawing of a new pair: all its in-betweens at once
                pair, inbetweens = (k0, k1), {}  # drop the previous pair's images first
                between = [x for x in drawings if k0 < x < k1]
                results = interpolate(images[k0], images[k1], [(x - k0) / (k1 - k0) for x in between])
                if len(results) != len(between):
                    raise ValueError(
                        f"interpolate returned {len(results)} images for {len(between)} times"
                    )
                inbetweens = dict(zip(between, results))
            image = inbetweens[d]
        for _ in range(end - d):
            yield image


def _check_shot(keyframes: Keyframes, keys: list[int], frames: int, drawings: list[int]) -> None:
    shot = keyframes.shot
    if frames <= 0:
        raise ValueError(f"shot {shot}: frames={frames}, must be > 0")
    if not keys:
        raise ValueError(f"shot {shot}: no keyframes")
    if not drawings or drawings[0] != 0:
        raise ValueError(f"shot {shot}: drawings must start at frame 0, got {drawings[:3]}")
    if any(x >= y for x, y in zip(drawings, drawings[1:])) or drawings[-1] >= frames:
        raise ValueError(
            f"shot {shot}: drawings must be strictly increasing and < frames={frames}, got {drawings}"
        )
    if keys[0] != 0:
        raise ValueError(f"shot {shot}: first keyframe is at frame {keys[0]}, must be at 0")
    if any(x >= y for x, y in zip(keys, keys[1:])):
        raise ValueError(f"shot {shot}: keyframe indices must be strictly increasing, got {keys}")
    stray = sorted(set(keys) - set(drawings))
    if stray:
        raise ValueError(f"shot {shot}: keyframes {stray} are not drawing starts {drawings}")
    first = keyframes.frames[0].image
    for f in keyframes.frames:
        img = f.image
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.shape != first.shape:
            raise ValueError(
                f"shot {shot}: keyframe {f.index} is {img.shape} {img.dtype}, "
                f"expected RGB uint8 {first.shape}"
            )
