"""In-betweening: the drawings between two keyframes, and the full frame stream of one shot.

Two interpolators share one call signature, ``interpolate(a, b, ts) -> list[image]``:

* ``FlowInterpolator`` ("flow", the default): OpenCV DIS optical flow computed once per
  keyframe pair in both directions, bidirectional backward warping of both neighbours to
  each time ``t``, blended by forward-backward consistency (occlusion) and temporal distance.
* ``Crossfade`` ("crossfade"): the linear blend baseline every quality figure is compared to.

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

VERSION = "1"

Interpolate = Callable[[np.ndarray, np.ndarray, list[float]], list[np.ndarray]]


def _check_pair(a: np.ndarray, b: np.ndarray, ts: list[float]) -> None:
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
        _check_pair(a, b, ts)
        return [cv2.addWeighted(a, 1.0 - t, b, t, 0.0) for t in ts]


class FlowInterpolator:
    """Occlusion-aware bidirectional optical-flow interpolation (OpenCV DIS, CPU).

    Args:
        preset: DIS preset, "ultrafast", "fast" or "medium" (slower, finer flow).
        flow_scale: flow is computed on images resized by this factor and upsampled; ``None``
            picks ``min(1, max_flow_side / long side)`` so 1080p stays fast.
        max_flow_side: long side of the flow images when ``flow_scale`` is ``None``.
        consistency_px: forward-backward disagreement (pixels, at full resolution) at which a
            side's weight halves; occluded or badly tracked pixels lean on the other side.
        min_weight: floor of a side's confidence, so where both sides are unreliable (flat cel
            regions DIS cannot track) the result falls back to a plain temporal blend of the
            two warps rather than to noise.
    """

    name = "flow"
    PRESETS = {
        "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
        "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
        "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
    }

    def __init__(
        self,
        *,
        preset: str = "fast",
        flow_scale: float | None = None,
        max_flow_side: int = 1024,
        consistency_px: float = 1.0,
        min_weight: float = 0.05,
    ):
        if preset not in self.PRESETS:
            raise ValueError(f"preset={preset!r}: known DIS presets are {sorted(self.PRESETS)}")
        if flow_scale is not None and not 0.0 < flow_scale <= 1.0:
            raise ValueError(f"flow_scale={flow_scale}: must be in (0, 1]")
        if max_flow_side < 16:
            raise ValueError(f"max_flow_side={max_flow_side}: must be at least 16")
        if consistency_px <= 0 or not 0.0 < min_weight <= 1.0:
            raise ValueError(
                f"consistency_px={consistency_px} must be > 0 and min_weight={min_weight} in (0, 1]"
            )
        self.preset, self.flow_scale, self.max_flow_side = preset, flow_scale, max_flow_side
        self.consistency_px, self.min_weight = consistency_px, min_weight
        self._dis = cv2.DISOpticalFlow_create(self.PRESETS[preset])

    def __call__(self, a: np.ndarray, b: np.ndarray, ts: list[float]) -> list[np.ndarray]:
        _check_pair(a, b, ts)
        if np.array_equal(a, b):  # a hold: nothing moves, no flow to compute
            return [a.copy() for _ in ts]

        # 1. Flow a→b and b→a, once for the pair, on grayscale (possibly downscaled).
        f01, f10 = self._flows(a, b)
        h, w = a.shape[:2]
        grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), -1)

        # 2. Forward-backward consistency in each keyframe's own coordinates: a pixel of a that
        #    flows to b and back should land where it started; where it does not, it is
        #    occluded in b or badly tracked, and a's contribution there is not to be trusted.
        conf0 = self._confidence(f01, _warp(f10, grid + f01))
        conf1 = self._confidence(f10, _warp(f01, grid + f10))

        # 3. Per time t: approximate the flow from t back to each keyframe with the flow at the
        #    target pixel (linear motion, Super-SloMo style), warp both neighbours and their
        #    confidences backward, blend by confidence × temporal closeness.
        out = []
        for t in ts:
            map0 = cv2.scaleAdd(f10, t * t, cv2.scaleAdd(f01, -(1.0 - t) * t, grid))
            map1 = cv2.scaleAdd(f10, -t * (1.0 - t), cv2.scaleAdd(f01, (1.0 - t) ** 2, grid))
            # fixed-point maps: one conversion each, then fast remaps of image and confidence
            map0 = cv2.convertMaps(map0, None, cv2.CV_16SC2)
            map1 = cv2.convertMaps(map1, None, cv2.CV_16SC2)
            w0 = _warp(conf0, *map0) * np.float32(1.0 - t)
            w1 = _warp(conf1, *map1) * np.float32(t)
            # (w0 * a_t + w1 * b_t) / (w0 + w1), per pixel; weights are >= min_weight > 0
            out.append(cv2.blendLinear(_warp(a, *map0), _warp(b, *map1), w0, w1))
        return out

    def _flows(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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

    def _confidence(self, flow: np.ndarray, back: np.ndarray) -> np.ndarray:
        err = cv2.magnitude(*cv2.split(cv2.add(flow, back))) / np.float32(self.consistency_px)
        conf = 1.0 / (1.0 + err * err)
        return np.float32(self.min_weight) + np.float32(1.0 - self.min_weight) * conf


def _warp(image: np.ndarray, coords: np.ndarray, fraction: np.ndarray | None = None) -> np.ndarray:
    """Backward warp: out(x) = image(coords(x)), bilinear, edges replicated."""
    return cv2.remap(image, coords, fraction, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


INTERPOLATORS: dict[str, type] = {cls.name: cls for cls in (FlowInterpolator, Crossfade)}


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
