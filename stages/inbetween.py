"""In-betweening: the drawings between two keyframes, and the full frame stream of one shot.

Three interpolators share one call signature, ``interpolate(a, b, ts) -> list[image]``:

* ``FlowInterpolator`` ("flow", the default): OpenCV DIS optical flow computed once per
  keyframe pair in both directions, bidirectional backward warping of both neighbours to
  each time ``t``, blended by temporal distance; samples from outside a keyframe (frame-edge
  occlusion) defer to the other keyframe.
* ``Crossfade`` ("crossfade"): the linear blend baseline every quality figure is compared to.
* ``RifeInterpolator`` ("rife", ``stages/rife.py``): RIFE 4.x with published weights (torch,
  CPU or GPU); its settings (``RifeSettings``) live here so that importing them never
  imports torch.

Each in-betweener has a settings model here (the profile's table of the same name);
``pipeline.registry`` makes each one an entry. ``shot_frames`` turns one shot's keyframes
into exactly ``frames`` RGB frames, streaming: memory is bounded by one keyframe pair's
in-betweens.
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field, SerializationInfo, model_serializer

from stages.records import Keyframes, Record

VERSION = "5"  # 4: frame-edge samples defer to the other keyframe by masked copy; 5: only where the flow is consistent

# Weight of a sample taken from outside a keyframe (motion across the frame edge): the
# replicated border is not what is there, so the other keyframe decides (+0.1 dB on bbb/120).
OUTSIDE_WEIGHT = 1e-3

Interpolate = Callable[[np.ndarray, np.ndarray, list[float]], list[np.ndarray]]

# Frame-edge rules of FlowInterpolator (``edge=``): "defer" copies the other keyframe's sample
# where one keyframe's sample lies outside its frame; "off" blends the two warps everywhere;
# "auto" (the default) defers on pairs whose flow is forward-backward inconsistent on at most
# EDGE_MAX_INCONSISTENT of the pixels, else blends. Measured (experiments/interp_bench.py, sets):
# deferring wins by 0.1-1 dB on wide-step pairs with a coherent flow (bbb 83k3, 224k3, 227k4) and
# loses 1-3 dB where the flow is noise (fades and cuts: bbb 12k3, 16k4, 376k4, inconsistent
# 0.85-1.0): there the pasted band is one keyframe's wrong warp, the blend at least half right.
EDGE_RULES = ("auto", "defer", "off")
EDGE_MAX_INCONSISTENT = 0.5


class FlowSettings(Record):
    """The profile's ``[flow]`` table."""

    preset: Literal["ultrafast", "fast", "medium"] = Field("medium", description="DIS preset (see FlowInterpolator).")


class CrossfadeSettings(Record):
    """The crossfade baseline has no settings."""


class RifeSettings(Record):
    """The profile's ``[rife]`` table. ``PLACEMENT`` never enters a content key."""

    PLACEMENT: ClassVar[frozenset[str]] = frozenset({"num_gpus", "gpu_type"})

    weights: str = Field(description="RIFE 4.x flownet.pkl, e.g. ../shared/data/weights/rife/flownet.pkl.")
    device: str = Field("cpu", description="'cpu' or a torch GPU device ('cuda', 'cuda:1').")
    passes: Literal["per_time", "one"] = Field("per_time", description=(
        "'per_time': one network pass per in-between (RIFE as published); 'one': one pass per keyframe pair at "
        "t = 0.5, retimed to its other in-betweens (stages.rife), about 0.22x the time at keyframe_stride 6."))
    num_gpus: float = Field(1.0, gt=0, description="GPUs each clip node holds when device is a GPU.")
    gpu_type: str = Field("H200", description="Price-catalog GPU type billed for them.")

    @model_serializer(mode="wrap")
    def _key(self, handler, info: SerializationInfo):
        """A content key leaves ``passes`` out at its default: stores rendered before it existed stay hits."""
        data = handler(self)
        if (info.context or {}).get("content_key") and data.get("passes") == "per_time":
            del data["passes"]
        return data


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
            texture and hair (+0.15 dB mean PSNR on the shared triplets, ~1.6x the time). See
            ``DIS_SETTINGS``.
        flow_scale: flow is computed on images resized by this factor and upsampled; ``None``
            picks ``min(1, max_flow_side / long side)``.
        max_flow_side: long side of the flow images when ``flow_scale`` is ``None``; the
            default keeps 1080p at full resolution.
        occlusion: forward-backward consistency occlusion weighting (off by default, see below).

    Per keyframe pair: the two DIS ``calc`` calls. Per in-between time ``t``, in strips of
    ``STRIP_ROWS`` rows whose scratch stays in cache (full-frame float maps were memory-bound),
    one row block per OpenCV thread: one weighted sum of the flows, two maps (``scaleAdd`` onto
    cached pixel coordinates, converted to fixed-point ``CV_16SC2``), two remaps and one
    ``addWeighted`` straight into the output; nothing is allocated per frame but the output.
    Samples from outside a keyframe (motion across the frame edge) can only occur within the
    largest flow component of the border, so only that band is checked: there the other
    keyframe's sample is copied in. At 1080p with three in-betweens per pair
    (``experiments/interp_bench.py --hd-only``) this is ~150 ms per in-between on one core with
    78% of the time inside DIS (89 ms and 77% on two threads; was 54% / 50% before the strips).
    The two bilinear remaps per frame are ~15 ms of the ~34 ms left on one core, which puts
    the ceiling of this method near 88% inside DIS: the 90% target is not reachable with two
    full-resolution warps per frame. An instance is not thread-safe (nor is DIS).

    Occlusion (``occlusion=True``): forward-backward consistency once per pair (Sundaram et
    al. 2010: ``|F01(x) + F10(x + F01(x))|² > 0.01 (|F01|² + |F10(x + F01(x))|²) + 0.5``, plus
    pixels that leave the frame) marks pixels of each keyframe absent from the other; at each
    ``t`` the two masks are warped with the images' own maps and, where the time-``t`` sample
    of one keyframe is content absent from the other keyframe, that other keyframe's weight
    drops to ``OCCLUDED_WEIGHT`` of its temporal weight. Measured (the "flow_occ" column of
    ``experiments/interp_bench.py``; ``tests/test_inbetween.py``): -0.04 dB mean PSNR on the
    shared triplets, and 0.1-0.2 dB below the plain blend on a disc uncovering a textured
    background although the masks find 90% of the covered background. The backward-warping
    flow at ``t`` is read at the target pixel, which in an uncovered region carries the
    occluder's motion, so the side the mask picks is itself sampled off by the motion; fixing
    that needs forward splatting of the flow to ``t``. Other uses of the masks measured no
    better (occlusion-aware flow fusion, photometric-residual weights, softer floors, blurred
    masks: -0.01 to -0.5 dB). Hence off by default.

    Also measured and not adopted (t = 0.5, mean PSNR on the 10 PNG triplets of
    ../shared/data/frames / the 17 of ``experiments/interp_bench.py``, default 31.53 / 30.86):
    the flow to ``t`` splatted from both flows (XVFI's complementary flow reversal) -0.02 /
    -0.03 dB; splatting only forward-backward consistent pixels +0.00 / +0.01 dB at ~1 s per
    frame, and letting the inconsistent pixels' splats decide visibility -0.12 / -0.13 dB; soft
    forward-backward error weights -0.02 to -0.16 dB; the flow picked per pixel among the target
    pixel and four neighbours 8 px away by agreement of the two warps +0.07 / +0.04 dB at ~3x
    the time; bicubic warps +0.01 / -0.06 dB; blurring the blend where the warps disagree
    +0.01 / +0.09 dB for ~+48 ms per 1080p frame; DIS refinement weights, iterations, patch 12,
    stride 3, finest scale 0, fused DIS settings, median-filtered flow, CLAHE / green / Lab L /
    blurred DIS input: -0.05 to +0.02 dB. What is left to RIFE is mostly bbb/430 (flapping
    wings) and bbb/487 (motion blur), where DIS's flow itself is wrong.
    """

    name = "flow"
    # (finest scale, patch size, patch stride, gradient descent iterations, variational
    # refinement iterations), measured on the shared triplets (experiments/interp_bench.py):
    # ultrafast and fast are OpenCV's presets (30.31 / 30.38 dB); medium = fast one pyramid
    # level finer (30.53 dB). OpenCV's own MEDIUM (1, 8, 3, 25, 5) adds 0.01 dB for 1.3x more;
    # full resolution (finest scale 0) adds 0.01 dB for 3.8x more.
    DIS_SETTINGS = {
        "ultrafast": (2, 8, 4, 12, 0),
        "fast": (2, 8, 4, 16, 5),
        "medium": (1, 8, 4, 16, 5),
    }
    OCCLUDED_WEIGHT = 0.25

    def __init__(self, *, preset: str = "medium", flow_scale: float | None = None, max_flow_side: int = 2048,
                 occlusion: bool = False, edge: str = "auto"):
        if preset not in self.DIS_SETTINGS:
            raise ValueError(f"preset={preset!r}: known DIS presets are {sorted(self.DIS_SETTINGS)}")
        if flow_scale is not None and not 0.0 < flow_scale <= 1.0:
            raise ValueError(f"flow_scale={flow_scale}: must be in (0, 1]")
        if max_flow_side < 16:
            raise ValueError(f"max_flow_side={max_flow_side}: must be at least 16")
        self.preset, self.flow_scale, self.max_flow_side = preset, flow_scale, max_flow_side
        if edge not in EDGE_RULES:
            raise ValueError(f"edge={edge!r}: known frame-edge rules are {sorted(EDGE_RULES)}")
        self.occlusion, self.edge = occlusion, edge
        self._dis = _dis(*self.DIS_SETTINGS[preset])
        self._buf: _Buffers | None = None  # per-size scratch: pixel grid, maps, warped images
        self._pool: ThreadPoolExecutor | None = None  # one warping thread per OpenCV thread, built on use

    def __call__(self, a: np.ndarray, b: np.ndarray, ts: list[float]) -> list[np.ndarray]:
        check_pair(a, b, ts)
        if np.array_equal(a, b):  # a hold: nothing moves, no flow to compute
            return [a.copy() for _ in ts]
        # 1. Flow a→b and b→a, once for the pair, on grayscale (possibly downscaled).
        f01, f10 = self.flows(a, b)
        return self.warp(a, b, f01, f10, ts)

    def warp(self, a: np.ndarray, b: np.ndarray, f01: np.ndarray, f10: np.ndarray, ts: list[float],
             confidence: PairConfidence | None = None) -> list[np.ndarray]:
        """The in-betweens of one pair at times ``ts`` from its two flows (``flows``): what
        ``__call__`` does after the flow, so that a caller that already has the flows and their
        ``confidence`` (the adaptive in-betweener, which judged the pair by them) computes neither
        twice."""
        h, w = a.shape[:2]
        defer = self.edge == "defer"
        if self.edge == "auto":
            confidence = confidence if confidence is not None else pair_confidence(a, b, f01, f10)
            defer = confidence.inconsistent <= EDGE_MAX_INCONSISTENT
        buf = self._buffers(h, w)
        occ = self._occlusion_masks(f01, f10, buf) if self.occlusion else None
        # Largest displacement of any map below, per axis: |t (t F10 - (1-t) F01)| <= max |F|.
        reach = max(cv2.norm(f01, cv2.NORM_INF), cv2.norm(f10, cv2.NORM_INF))
        band = min(int(np.ceil(reach)) + 1, h, w) if defer else 0

        # 2. Per time t: approximate the flow from t back to each keyframe with the flow at the
        #    target pixel (linear motion, Super-SloMo style: both flows vote),
        #        x + t·D  in a,   x - (1-t)·D  in b,   D = t·F10 - (1-t)·F01,
        #    warp both neighbours backward and blend by temporal closeness. Done in strips of
        #    rows whose scratch stays in cache: the full-frame maps were memory-bound.
        #    Rows are split into one contiguous block per OpenCV thread, each block warped by its
        #    own pool thread (OpenCV releases the GIL) with its own scratch.
        blocks = _row_blocks(h, cv2.getNumThreads())
        out = []
        for t in ts:
            image = np.empty_like(a)
            work = [(a, b, f01, f10, t, image, lo, hi, buf.scratch(i), band, occ) for i, (lo, hi) in enumerate(blocks)]
            if len(work) == 1:
                _warp_rows(*work[0])
            else:
                for done in [self._threads(len(work)).submit(_warp_rows, *job) for job in work]:
                    done.result()
            out.append(image)
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

    def _threads(self, n: int) -> ThreadPoolExecutor:
        """This instance's warping threads (its threads end with it)."""
        if self._pool is None or self._pool._max_workers < n:
            self._pool = ThreadPoolExecutor(n, thread_name_prefix="inbetween")
        return self._pool

    def _buffers(self, h: int, w: int) -> _Buffers:
        if self._buf is None or self._buf.shape != (h, w):
            self._buf = _Buffers(h, w)
        return self._buf

    def _occlusion_masks(self, f01: np.ndarray, f10: np.ndarray, buf: _Buffers) -> tuple[np.ndarray, np.ndarray]:
        """(occ0, occ1) uint8 0/255: pixels of a absent from b, pixels of b absent from a."""
        return _fb_occlusion(f01, f10, buf), _fb_occlusion(f10, f01, buf)


STRIP_ROWS = 32  # rows per warping strip: its scratch (~3 MB at 1920 wide) stays in L2/L3; fewer, larger
# strips cut the Python calls per frame: at 1080p on 2 threads 97 → 90 ms per in-between, 72% → 77% inside DIS
# (8 vs 32 rows, side by side); the same on one core. Outputs do not depend on it.


class _Strip:
    """Scratch for one strip of rows: coordinates, maps, fixed-point maps, warped rows."""

    def __init__(self, rows: int, w: int):
        xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(rows, dtype=np.float32))
        self.base = cv2.merge([xs, ys])  # coordinates of a strip starting at row 0
        self.grid, self.d, self.map0, self.map1 = (np.empty((rows, w, 2), np.float32) for _ in range(4))
        self.fix0, self.fix1 = (np.empty((rows, w, 2), np.int16) for _ in range(2))
        self.frac0, self.frac1 = (np.empty((rows, w), np.uint16) for _ in range(2))
        self.a_t, self.b_t = (np.empty((rows, w, 3), np.uint8) for _ in range(2))


class _Scratch:
    """The strip scratch of one thread: a full strip and, if the height needs it, the last one."""

    def __init__(self, h: int, w: int):
        self._strips = {STRIP_ROWS: _Strip(STRIP_ROWS, w)}
        for rows in {h % STRIP_ROWS} - {0}:
            self._strips[rows] = _Strip(rows, w)

    def strip(self, rows: int) -> _Strip:
        if rows not in self._strips:  # a block boundary can only fall on whole strips
            raise AssertionError(f"no scratch for a strip of {rows} rows")
        return self._strips[rows]


class _Buffers:
    """Scratch for one image size, built once and reused across pairs and times: nothing is
    allocated per frame but the output image."""

    def __init__(self, h: int, w: int):
        self.shape, self.size = (h, w), (w, h)
        self._scratch: list[_Scratch] = []
        self._grid: np.ndarray | None = None

    def scratch(self, block: int) -> _Scratch:
        """The strips of one row block (one per thread), built on first use."""
        while len(self._scratch) <= block:
            self._scratch.append(_Scratch(*self.shape))
        return self._scratch[block]

    @property
    def grid(self) -> np.ndarray:
        """Full-frame pixel coordinates (occlusion masks only), built on first use."""
        if self._grid is None:
            h, w = self.shape
            xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
            self._grid = cv2.merge([xs, ys])
        return self._grid


def _row_blocks(h: int, n: int) -> list[tuple[int, int]]:
    """Split rows 0..h into at most ``n`` contiguous blocks of whole strips."""
    strips = -(-h // STRIP_ROWS)
    n = max(1, min(n, strips))
    edges = [round(i * strips / n) * STRIP_ROWS for i in range(n + 1)]
    return [(lo, min(hi, h)) for lo, hi in zip(edges, edges[1:]) if lo < h]


def _warp_rows(a, b, f01, f10, t, image, lo, hi, scratch, band, occ) -> None:
    """Warp and blend rows lo..hi of the in-between at time t into ``image``, strip by strip."""
    h, w = a.shape[:2]
    for r0 in range(lo, hi, STRIP_ROWS):
        r1 = min(hi, r0 + STRIP_ROWS)
        s = scratch.strip(r1 - r0)
        cv2.add(s.base, (0.0, float(r0), 0.0, 0.0), dst=s.grid)  # pixel coordinates of the strip
        cv2.addWeighted(f10[r0:r1], t, f01[r0:r1], -(1.0 - t), 0.0, dst=s.d)
        cv2.scaleAdd(s.d, t, s.grid, dst=s.map0)
        cv2.scaleAdd(s.d, -(1.0 - t), s.grid, dst=s.map1)
        # fixed-point maps: one conversion each, then fast remaps
        cv2.convertMaps(s.map0, None, cv2.CV_16SC2, dstmap1=s.fix0, dstmap2=s.frac0)
        cv2.convertMaps(s.map1, None, cv2.CV_16SC2, dstmap1=s.fix1, dstmap2=s.frac1)
        cv2.remap(a, s.fix0, s.frac0, cv2.INTER_LINEAR, dst=s.a_t, borderMode=cv2.BORDER_REPLICATE)
        cv2.remap(b, s.fix1, s.frac1, cv2.INTER_LINEAR, dst=s.b_t, borderMode=cv2.BORDER_REPLICATE)
        if occ is None:
            cv2.addWeighted(s.a_t, 1.0 - t, s.b_t, t, 0.0, dst=image[r0:r1])
            for cols in _edge_columns(r0, r1, h, w, band):
                _defer_outside(s, image[r0:r1, cols], cols, w, h)
        else:
            image[r0:r1] = _occlusion_blend(s, occ, t, w, h)


def _edge_columns(r0: int, r1: int, h: int, w: int, band: int) -> list[slice]:
    """Columns of rows r0:r1 within ``band`` of the frame edge, where a map can point outside
    (none with ``band`` 0: the frame-edge rule is off)."""
    if band <= 0:
        return []
    if r0 < band or r1 > h - band or 2 * band >= w:
        return [slice(0, w)]
    return [slice(0, band), slice(w - band, w)]


def _inside(m: np.ndarray, w: int, h: int) -> np.ndarray:
    """255 where a map points inside the image (so bilinear reads real pixels), else 0."""
    return cv2.inRange(m, (0.0, 0.0), (w - 1.0, h - 1.0))


def _weights(mask: np.ndarray, weight: float, floor: float) -> np.ndarray:
    """float32 ``weight`` where mask is 255, ``weight * floor`` where it is 0."""
    return cv2.addWeighted(mask, weight * (1.0 - floor) / 255.0, mask, 0.0, weight * floor, dtype=cv2.CV_32F)


def _defer_outside(s: _Strip, out: np.ndarray, cols: slice, w: int, h: int) -> None:
    """Border columns of a strip: where one keyframe's sample lies outside its frame (the
    replicated border, not what is there) and the other's does not, the other keyframe is
    copied in (+0.1 dB on bbb/120). Byte masks and a masked copy: the float-weighted blend it
    replaces cost a third of the per-frame time outside the warps at 1080p."""
    in0, in1 = _inside(s.map0[:, cols], w, h), _inside(s.map1[:, cols], w, h)
    only1 = cv2.subtract(in1, in0)  # 255 where only b's sample is inside its frame
    only0 = cv2.subtract(in0, in1)
    if cv2.countNonZero(only1):
        cv2.copyTo(s.b_t[:, cols], only1, out)
    if cv2.countNonZero(only0):
        cv2.copyTo(s.a_t[:, cols], only0, out)


def _fb_occlusion(f01: np.ndarray, f10: np.ndarray, buf: _Buffers) -> np.ndarray:
    """Pixels x of frame 0 with no consistent match in frame 1 (uint8 0/255)."""
    w, h = buf.size
    target = cv2.add(f01, buf.grid)
    back = cv2.remap(f10, target, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    err = cv2.add(f01, back)
    mag = cv2.magnitude(err[..., 0], err[..., 1])
    ref = cv2.magnitude(f01[..., 0], f01[..., 1]) ** 2 + cv2.magnitude(back[..., 0], back[..., 1]) ** 2
    occ = np.where(mag * mag > 0.01 * ref + 0.5, 255, 0).astype(np.uint8)
    cv2.bitwise_or(occ, cv2.bitwise_not(_inside(target, w, h)), dst=occ)  # leaves the frame
    return occ


def _occlusion_blend(s: _Strip, occ: tuple[np.ndarray, np.ndarray], t: float, w: int, h: int) -> np.ndarray:
    """Blend of a strip where each side's weight drops where the other side's sample is content
    it lacks (the masks warped with the images' own maps), and outside the frame."""
    o0 = cv2.remap(occ[0], s.fix0, s.frac0, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    o1 = cv2.remap(occ[1], s.fix1, s.frac1, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    floor = FlowInterpolator.OCCLUDED_WEIGHT
    w0 = _weights(cv2.bitwise_not(o1), 1.0 - t, floor)  # b's sample absent from a: a cannot have it
    w1 = _weights(cv2.bitwise_not(o0), t, floor)
    cv2.multiply(w0, _weights(_inside(s.map0, w, h), 1.0, OUTSIDE_WEIGHT), dst=w0)
    cv2.multiply(w1, _weights(_inside(s.map1, w, h), 1.0, OUTSIDE_WEIGHT), dst=w1)
    return cv2.blendLinear(s.a_t, s.b_t, w0, w1)


CONFIDENCE_SIDE = 160  # long side of the images the confidence is measured on (cheap next to DIS)


class PairConfidence(Record):
    """How far one keyframe pair's flow can be trusted, from what the flow pass already has.

    Measured on the two flows and the two grayscale keyframes, all resized so that the long side
    is ``CONFIDENCE_SIDE`` pixels (flows in pixels of that size), so that the figures mean the
    same at every frame size:

    * ``inconsistent``: share of pixels of either keyframe whose forward and backward flows
      disagree (Sundaram et al. 2010, the test of ``_fb_occlusion``) or that leave the frame;
    * ``motion``: 95th percentile of the flow magnitude, as a share of the image's long side;
    * ``spread``: standard deviation of the flow vectors (both components), same unit: one
      rigid pan has none, a foreground moving against its background much;
    * ``residual``: mean absolute difference (0–255 grey levels) between each keyframe and the
      other warped onto it by the flow, on the consistent pixels: what the flow fails to explain;
    * ``unaligned``: the same difference without the flow (how much the pair changes at all).

    ``score`` is one number in [0, 1] (1: the flow explains the pair): the share of the pair's
    change the flow explains, ``1 - residual / max(unaligned, 1)``, times the consistent share
    ``1 - inconsistent``. Measured on the tune split of ``experiments/interp_sets.py`` (see
    ``experiments/interp_bench.py``, which prints flow - RIFE binned by ``motion`` and by ``score``):
    the pairs where RIFE beats the flow are those with subtle motion (``motion`` below ~0.0025: a pixel
    or two at 640 px, where DIS's patches cost more than they explain), not the ones with the largest
    motion — the flow beats RIFE on most wide-step pairs, fades and cuts included. So ``motion`` and
    ``spread`` do not enter the score; the adaptive in-betweener routes by ``motion`` and ``score``.
    """

    inconsistent: float
    motion: float
    spread: float
    residual: float
    unaligned: float

    @property
    def score(self) -> float:
        return confidence_score(self)


def confidence_score(c: PairConfidence) -> float:
    """The share of the change the flow explains times its consistent share (see ``PairConfidence``);
    a pair that hardly changes (``unaligned`` below one grey level) counts its change as one level."""
    explained = max(0.0, 1.0 - c.residual / max(c.unaligned, 1.0))
    return float(explained * (1.0 - c.inconsistent))


def pair_confidence(a: np.ndarray, b: np.ndarray, f01: np.ndarray, f10: np.ndarray) -> PairConfidence:
    """The ``PairConfidence`` of keyframes ``a``, ``b`` (RGB uint8) and their flows a→b, b→a
    (``FlowInterpolator.flows``), measured at ``CONFIDENCE_SIDE``: a few ms at any frame size."""
    h, w = a.shape[:2]
    k = min(1.0, CONFIDENCE_SIDE / max(h, w))
    size = (max(8, round(w * k)), max(8, round(h * k)))
    sx, sy = size[0] / w, size[1] / h

    def small(img: np.ndarray) -> np.ndarray:  # bilinear: a tenth of an area resize's time, and these are statistics
        return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)

    ga = small(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)).astype(np.float32)
    gb = small(cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)).astype(np.float32)
    g01, g10 = (small(f) * np.float32([sx, sy]) for f in (f01, f10))
    xs, ys = np.meshgrid(np.arange(size[0], dtype=np.float32), np.arange(size[1], dtype=np.float32))
    grid = cv2.merge([xs, ys])
    bad, res = [], []
    for fwd, bwd, src, dst in ((g01, g10, ga, gb), (g10, g01, gb, ga)):
        target = cv2.add(fwd, grid)
        back = cv2.remap(bwd, target, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        err = cv2.add(fwd, back)
        ref = (fwd ** 2).sum(-1) + (back ** 2).sum(-1)
        inside = ((target[..., 0] >= 0) & (target[..., 0] <= size[0] - 1)
                  & (target[..., 1] >= 0) & (target[..., 1] <= size[1] - 1))
        ok = inside & ((err ** 2).sum(-1) <= 0.01 * ref + 0.5)
        bad.append(1.0 - ok.mean())
        warped = cv2.remap(dst, target, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        res.append(float(np.abs(warped - src)[ok].mean()) if ok.any() else 255.0)
    mag = np.sqrt((g01 ** 2).sum(-1))
    side = float(max(size))
    return PairConfidence(
        inconsistent=float(np.mean(bad)), motion=float(np.percentile(mag, 95)) / side,
        spread=float(np.sqrt(g01.reshape(-1, 2).var(0).sum())) / side,
        residual=float(np.mean(res)), unaligned=float(np.abs(ga - gb).mean()),
    )


def _dis(finest_scale: int, patch: int, stride: int, descent: int, refine: int) -> cv2.DISOpticalFlow:
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    dis.setFinestScale(finest_scale)
    dis.setPatchSize(patch)
    dis.setPatchStride(stride)
    dis.setGradientDescentIterations(descent)
    dis.setVariationalRefinementIterations(refine)
    return dis


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
