"""Fit a render to a budget: walk the cost levers from least to most visible and stop when it fits.

The ladder (each step keeps the ones before it):

1. price levers, which cost no quality: the cheapest GPU type with a calibration row (and
   spot pricing when allowed);
2. hold static shots on one drawing;
3. one background plate per location (diffusers, layered keyframes);
4. fewer generated keyframes: a keyframe every 6, then 8, then 12 drawings (in-betweens fill);
5. animate on threes instead of twos;
6. fewer denoising steps (diffusers): halve, down to 2;
7. lower resolution: 1080 → 720 → 540 → 360 on the short side (generation size for diffusers).

Each proposal carries every step taken with the estimate after it — the "why". Estimates
come from ``make_plan``, so they trace to calibration and price rows like any plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pipeline.calibration import Calibration
from pipeline.cost import PriceCatalog
from stages.records import AnimError
from stages.records import Episode
from pipeline.models import Profile
from pipeline.plan import make_plan


@dataclass
class Proposal:
    profile: Profile
    tier: str
    estimate_yuan: float
    fits: bool
    steps: list[tuple[str, float]] = field(default_factory=list)  # (what changed, estimate after it)


def _kf(p: Profile):
    """The keyframe backend's settings: levers below apply where it has the setting they turn."""
    return p.settings_for("keyframes")


def _diffusion(p: Profile, **changes) -> Profile:
    return p.with_settings("keyframes", **changes)


def _gpu_stages(p: Profile) -> list[str]:
    return [stage for stage in ("storyboard", "keyframes", "inbetween") if p.resources(stage).gpus]


def _on_gpu(p: Profile, gpu: str) -> Profile:
    for stage in _gpu_stages(p):
        p = p.with_settings(stage, gpu_type=gpu)
    return p


def _ladder(p: Profile) -> list[tuple[str, Callable[[Profile], Profile | None]]]:
    """(description, change) pairs; a change returns None where it does not apply."""
    steps: list[tuple[str, Callable[[Profile], Profile | None]]] = [
        ("hold static shots on one drawing", lambda q: None if q.hold_static else q.replace(hold_static=True)),
        # layered plates composite through img2img; a txt2img profile has no layout to composite into
        ("one background plate per location", lambda q: None if getattr(_kf(q), "layered", True)
         or getattr(_kf(q), "mode", None) != "img2img" else _diffusion(q, layered=True)),
    ]
    for stride in (6, 8, 12):
        steps.append((f"a keyframe every {stride} drawings",
                      lambda q, s=stride: q.replace(keyframe_stride=s) if q.keyframe_stride < s else None))
    steps.append(("animate on threes", lambda q: q.replace(animate_on=3) if q.animate_on < 3 else None))
    for _ in range(3):
        steps.append(("halve the denoising steps", lambda q: _diffusion(q, steps=max(2, _kf(q).steps // 2))
                      if getattr(_kf(q), "steps", 0) > 2 else None))
    for side in (720, 540, 360):
        steps.append((f"render at {side}p", lambda q, s=side: _lower(q, s)))
    return steps


def _lower(p: Profile, side: int) -> Profile | None:
    if "gen_short_side" in type(_kf(p)).model_fields:
        current = _kf(p).gen_short_side or p.short_side
        return _diffusion(p, gen_short_side=side) if current > side else None
    return p.replace(short_side=side) if p.short_side > side else None


def fit_budget(episode: Episode, profile: Profile, budget_yuan: float, *, calibration: Calibration,
               prices: PriceCatalog, allow_spot: bool, script_sha256: str) -> Proposal:
    """The least-degraded profile whose estimate fits ``budget_yuan`` (or the cheapest, marked not fitting)."""

    def estimate(p: Profile, catalog: PriceCatalog) -> float:
        return make_plan(episode, p, calibration=calibration, prices=catalog,
                         script_sha256=script_sha256).estimated_cost_yuan

    # 1. Price levers first: they cost no quality.
    tiers = ["on-demand"] + (["spot"] if allow_spot else [])
    gpus = prices.gpu_types() if _gpu_stages(profile) else [None]
    options = []
    for tier in tiers:
        for gpu in gpus:
            p = _on_gpu(profile, gpu) if gpu else profile
            try:
                options.append((estimate(p, prices.with_tier(tier)), tier, p, gpu))
            except AnimError:  # no calibration or price row for this GPU/tier: not an option
                continue
    if not options:
        raise AnimError(f"profile {profile.name}: no GPU type has both a calibration row and a price row")
    cost, tier, current, gpu = min(options, key=lambda o: o[0])
    catalog = prices.with_tier(tier)
    steps = [(f"as given ({profile.name}, on-demand)", estimate(profile, prices))]
    if cost < steps[0][1]:
        steps.append((f"price: {'GPU ' + gpu + ', ' if gpu else ''}{tier}", cost))
    # 2. Then the visible levers, in order, until it fits.
    for what, change in _ladder(current):
        if cost <= budget_yuan:
            break
        changed = change(current)
        if changed is None:
            continue
        new_cost = estimate(changed, catalog)
        if new_cost >= cost:  # a lever that does not pay here (e.g. plates for very short scenes): skip it
            continue
        current, cost = changed, new_cost
        steps.append((what, cost))
    return Proposal(profile=current.replace(name=f"{profile.name}-fit"), tier=tier,
                    estimate_yuan=cost, fits=cost <= budget_yuan, steps=steps)
