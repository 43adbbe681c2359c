"""Keyframes stage: the drawings of each shot at its keyframe indices.

Backends are classes in ``BACKENDS``; a new backend is a new class and a registry entry.
``previz`` draws flat cel-style frames on the CPU with ``stages.draw`` — no weights, fully
deterministic — and reuses one background plate per (location, time of day, size).
``diffusers`` (``stages.diffusion``, needs the ``gen`` extra) draws them with a diffusers model
and takes ``settings=DiffusionSettings`` besides the size.
"""
from __future__ import annotations

from stages.records import Frame, Keyframes

from pipeline.models import ShotPlan
from stages.draw import render_cel

VERSION = "1"


class PrevizKeyframes:
    """Cel-style previz keyframes; the plate cache lives in the instance (one per actor)."""

    name = "previz"

    def __init__(self, *, width: int, height: int):
        if width < 16 or height < 16:
            raise ValueError(f"PrevizKeyframes: size {width}x{height} is too small (at least 16x16)")
        self.width, self.height = width, height
        self._plates: dict[tuple, object] = {}

    def __call__(self, shots: list[ShotPlan]) -> list[Keyframes]:
        out = []
        for plan in shots:
            frames = [Frame(index=k, image=render_cel(plan, t, self.width, self.height, self._plates))
                      for k, t in zip(plan.keyframes, plan.keyframe_times)]
            out.append(Keyframes(shot=plan.shot.id, frames=frames))
        return out


def _diffusers(**kwargs):
    """The diffusers backend, imported only when asked for: importing this module never imports torch."""
    from stages.diffusion import DiffusersKeyframes
    return DiffusersKeyframes(**kwargs)


BACKENDS: dict[str, object] = {"previz": PrevizKeyframes, "diffusers": _diffusers}


def backend(name: str, **kwargs):
    """An instance of the keyframe backend called ``name``, built with ``kwargs``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown keyframe backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](**kwargs)
