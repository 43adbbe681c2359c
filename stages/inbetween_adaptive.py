"""Adaptive in-betweening: each keyframe pair goes to the cheapest method that is good enough.

Per pair, the flow in-betweener's two DIS flows are computed (they are needed anyway) and judged
by ``stages.inbetween.pair_confidence`` (forward-backward consistency, flow magnitude and spread,
warp residual): a few ms next to the flow. Then

* with ``fallback`` "crossfade" or "hold", a pair whose flow is forward-backward inconsistent on
  more than ``fallback_above`` of its pixels (no coherent motion: a cut, a flash, a drawing that
  changes shape between keyframes, which neither the flow nor RIFE can follow) gets the fallback;
* else RIFE 4.x (``stages.rife``, CPU or GPU) where the flow is not to be trusted with the pair:
  its confidence (``PairConfidence.score``, the share of the change the flow explains) is below
  ``threshold``, or its motion is subtle (``PairConfidence.motion``, the 95th percentile of the flow
  magnitude as a share of the long side, below ``subtle_motion``): there DIS's patches add block
  artefacts to a change of a pixel or two that RIFE renders cleanly. The route's in-betweens are
  RIFE's mixed with the flow's (``rife_weight`` of RIFE, the rest the flow's, warped from the flows
  already computed): the two methods err differently, and the mix beats both on most pairs of the
  sets; with ``subtle_alone`` a pair sent for its subtle motion gets RIFE's in-betweens alone. With ``rife_passes`` "one" RIFE runs once per pair, at t = 0.5, and its flows and mask are
  retimed to the pair's other in-betweens (``stages.rife.retime``): at the default 5 in-betweens per
  pair that costs about 0.22× of RIFE's pass per in-between, and scored on every in-between with a
  true frame it is close to RIFE's own passes (tune 30.18 vs 30.04 dB, fresh 31.31 vs 31.53);
* every other pair is *confident*: the flow in-betweens, warped from the flows already computed.

RIFE is built on the first pair that needs it, so a shot whose pairs are all confident never loads
its weights. The defaults (fallback "crossfade" above 0.4, threshold 1.0, subtle_motion 0.001 with
``subtle_alone``, rife_weight 0.5, one pass) are the choice of the bench's declared rule
(``experiments/interp_bench.py``) on every part of the sets but the last (tune, report, fresh,
unseen: the "seen" protocol), fixed in advance to become the defaults if it met the target on the
final part, which no choice had seen (``experiments/results/interp_sets.md``, run E). It did: on
final bbb and chaplin ≥ RIFE on every step (+0.03 and +0.09 dB on consecutive frames, +0.23 to
+0.52 dB on wide steps) at 0.25× RIFE's CPU time per frame. With threshold 1.0 every coherent pair
takes the RIFE route: a pair nearly still (motion below 0.001 of the long side) gets RIFE's own
in-betweens, every other one RIFE's mixed 1 : 1 with the flow's; the mix beats both methods on the
wide steps, and RIFE alone keeps the slow pans where the mix lost to it. The flow route stays for
profiles that set a lower threshold (the confidence then decides). At one in-between per pair the
single pass saves nothing, and the method costs 0.9–1.1× RIFE's time (run F); against the flow alone it costs
~7× its time per frame, for +0.31 dB on final chaplin and −0.05 dB on final bbb at the render's own
step (k = 3).

The instance counts its routes (``routes``: pairs per route) and the seconds spent in each method
(``seconds``; the flow and the confidence are billed to "flow", paid on every pair), which the clip
node bills separately and writes into the render's quality record. The threshold and the route
shares are measured in ``experiments/interp_bench.py`` on the sets of ``experiments/interp_sets.py``.

The in-betweeners are given, not imported (a stage does not import another stage): the registry
entry builds them.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field

from stages.inbetween import check_pair, pair_confidence
from stages.records import Record

ROUTES = ("flow", "rife", "fallback")
FALLBACKS = ("none", "crossfade", "hold")
# the defaults: chosen by the bench's rule on every part of experiments/interp_sets.py but the final one (tune,
# report, fresh, unseen) and checked on the final part, where they meet the target (see the module docstring)
THRESHOLD = 1.0
SUBTLE_MOTION = 0.001
RIFE_WEIGHT = 0.5
RIFE_PASSES = "one"
FALLBACK = "crossfade"
FALLBACK_ABOVE = 0.4
SUBTLE_ALONE = True


class AdaptiveSettings(Record):
    """The profile's ``[adaptive]`` table. ``PLACEMENT`` never enters a content key."""

    PLACEMENT: ClassVar[frozenset[str]] = frozenset({"num_gpus", "gpu_type"})

    # threshold, subtle_motion, subtle_alone, rife_weight, rife_passes and the fallback: chosen by the rule the bench
    # prints (within 1/3 of RIFE's time: the best worst set/step, then the best mean, then the cheapest, then the
    # smallest thresholds, then RIFE's largest weight, then a pass per in-between, then one weight) on the tune,
    # report, fresh and unseen parts of experiments/interp_sets.py, checked on its final part (module docstring)
    threshold: float = Field(THRESHOLD, ge=0.0, le=1.0,
                             description="Pairs whose flow confidence is below this go to RIFE.")
    subtle_motion: float = Field(SUBTLE_MOTION, ge=0.0, le=1.0, description=(
        "Pairs whose motion (95th percentile flow magnitude / long side) is below this go to RIFE."))
    rife_weight: float = Field(RIFE_WEIGHT, gt=0.0, le=1.0, description=(
        "RIFE's share of the in-betweens of a pair routed to RIFE, the rest the flow's (1: RIFE alone)."))
    subtle_alone: bool = Field(SUBTLE_ALONE, description=(
        "Pairs sent to RIFE for their subtle motion get RIFE's in-betweens alone (rife_weight then applies to the "
        "pairs sent for their low score)."))
    rife_passes: Literal["per_time", "one"] = Field(RIFE_PASSES, description=(
        "RIFE's passes on the RIFE route: 'per_time', one per in-between, or 'one' per pair, at t = 0.5, retimed "
        "to the pair's other in-betweens (stages.rife)."))
    fallback: Literal["none", "crossfade", "hold"] = Field(
        FALLBACK, description="What pairs with an incoherent flow get instead ('none': the flow or RIFE, by confidence).")
    fallback_above: float = Field(FALLBACK_ABOVE, ge=0.0, le=1.0,
                                  description="Forward-backward inconsistent share above which the fallback is used.")
    preset: Literal["ultrafast", "fast", "medium"] = Field("medium", description="DIS preset of the flow route.")
    weights: str = Field(description="RIFE 4.x flownet.pkl, e.g. ../shared/data/weights/rife/flownet.pkl.")
    device: str = Field("cpu", description="RIFE's device: 'cpu' or a torch GPU device ('cuda', 'cuda:1').")
    num_gpus: float = Field(1.0, gt=0, description="GPUs each clip node holds when device is a GPU.")
    gpu_type: str = Field("H200", description="Price-catalog GPU type billed for them.")


class AdaptiveInterpolator:
    """Flow where the pair is confident, RIFE where it is not, optionally a fallback below both.

    Args:
        flow: a ``FlowInterpolator`` (its ``flows`` and ``warp`` are used).
        rife: a RIFE in-betweener, or a no-argument factory of one (called on first need).
        confidence: (a, b, f01, f10) → a record with ``score``; ``pair_confidence`` by default.
        crossfade: the crossfade in-betweener (the "crossfade" fallback).
        threshold, subtle_motion, rife_weight, fallback, fallback_above, subtle_alone: see ``AdaptiveSettings``.
    """

    name = "adaptive"

    def __init__(self, *, flow: Any, rife: Callable[..., list[np.ndarray]] | Callable[[], Any],
                 crossfade: Callable[..., list[np.ndarray]], threshold: float, subtle_motion: float,
                 rife_weight: float = RIFE_WEIGHT, confidence: Callable[..., Any] = pair_confidence,
                 fallback: str = "none", fallback_above: float = 0.4, subtle_alone: bool = SUBTLE_ALONE,
                 lazy: bool = True):
        if not all(0.0 <= x <= 1.0 for x in (threshold, subtle_motion, fallback_above)):
            raise ValueError(f"threshold={threshold}, subtle_motion={subtle_motion}, fallback_above={fallback_above}: "
                             "must lie in [0, 1]")
        if not 0.0 < rife_weight <= 1.0:
            raise ValueError(f"rife_weight={rife_weight}: must lie in (0, 1]")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback={fallback!r}: known fallbacks are {', '.join(FALLBACKS)}")
        self.flow, self.confidence, self.crossfade = flow, confidence, crossfade
        self._rife, self._rife_factory = (None, rife) if lazy else (rife, None)
        self.threshold, self.subtle_motion, self.rife_weight = threshold, subtle_motion, rife_weight
        self.fallback, self.fallback_above, self.subtle_alone = fallback, fallback_above, subtle_alone
        self.routes = {r: 0 for r in ROUTES}
        self.seconds = {r: 0.0 for r in ROUTES}
        self.scores: list[float] = []  # each pair's confidence, in call order

    @property
    def rife(self) -> Any:
        """The RIFE in-betweener, built on first use."""
        if self._rife is None:
            self._rife = self._rife_factory()
        return self._rife

    def route(self, confidence: Any) -> str:
        """Which route a pair of this ``confidence`` takes: a pure function of it."""
        if self.fallback != "none" and confidence.inconsistent > self.fallback_above:
            return "fallback"
        if confidence.score < self.threshold or confidence.motion < self.subtle_motion:
            return "rife"
        return "flow"

    def weight(self, confidence: Any) -> float:
        """RIFE's share of a RIFE-routed pair's in-betweens: 1 for a subtle-motion pair with ``subtle_alone``."""
        return 1.0 if self.subtle_alone and confidence.motion < self.subtle_motion else self.rife_weight

    def __call__(self, a: np.ndarray, b: np.ndarray, ts: list[float]) -> list[np.ndarray]:
        check_pair(a, b, ts)
        t0 = time.perf_counter()
        if np.array_equal(a, b):  # a hold: copies, no flow, no net (the flow in-betweener's own rule)
            out = self.flow(a, b, ts)
            self._bill("flow", t0)
            return out
        f01, f10 = self.flow.flows(a, b)
        confidence = self.confidence(a, b, f01, f10)
        self.scores.append(float(confidence.score))
        route = self.route(confidence)
        if route == "flow":
            out = self.flow.warp(a, b, f01, f10, ts, confidence=confidence)
            self._bill("flow", t0)
            return out
        w = self.weight(confidence)
        mix = route == "rife" and w < 1.0
        flowed = self.flow.warp(a, b, f01, f10, ts, confidence=confidence) if mix else None
        self._bill("flow", t0, count=False)  # the flow and its judgement (and its in-betweens) were paid here too
        t1 = time.perf_counter()
        if route == "rife":
            out = self.rife(a, b, ts)
            if flowed is not None:
                out = [cv2.addWeighted(r, w, f, 1.0 - w, 0.0) for r, f in zip(out, flowed)]
        elif self.fallback == "crossfade":
            out = self.crossfade(a, b, ts)
        else:  # hold: the nearer keyframe
            out = [(a if t < 0.5 else b).copy() for t in ts]
        self._bill(route, t1)
        return out

    def _bill(self, route: str, since: float, count: bool = True) -> None:
        self.seconds[route] += time.perf_counter() - since
        if count:
            self.routes[route] += 1
