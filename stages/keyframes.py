"""Keyframes stage: the drawings of each shot at its keyframe indices.

A keyframe backend is a callable class: ``backend(requests: list[KeyframeRequest]) ->
list[Keyframes]``, one ``Keyframes`` per request, drawn at the frames and times the request
names and seeded by its ``seed``. Each backend has a settings model (the profile's table of
the same name) that lives here, beside the stage; ``pipeline.registry`` makes each one an
entry.

* ``previz`` draws flat cel-style frames on the CPU with ``stages.draw`` — no weights, fully
  deterministic — and reuses one background plate per (location, time of day, size).
* ``diffusers`` (``stages.diffusion``, needs the ``gen`` extra; importing this module never
  imports torch) draws them with a diffusers model, configured by ``DiffusionSettings``.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from stages.draw import render_cel
from stages.records import Frame, KeyframeRequest, Keyframes, Record, ShotScene
from stages.staging import layout

VERSION = "3"  # 3: mouths follow the measured speech envelope


class PrevizSettings(Record):
    """The previz backend has no settings of its own: the profile's size decides everything."""


class PrevizKeyframes:
    """Cel-style previz keyframes; the plate cache lives in the instance (one per worker)."""

    name = "previz"

    def __init__(self, *, width: int, height: int):
        if width < 16 or height < 16:
            raise ValueError(f"PrevizKeyframes: size {width}x{height} is too small (at least 16x16)")
        self.width, self.height = width, height
        self._plates: dict[tuple, object] = {}

    def __call__(self, requests: list[KeyframeRequest]) -> list[Keyframes]:
        out = []
        for req in requests:
            frames = [Frame(index=k, image=render_cel(req.scene, t, self.width, self.height, self._plates))
                      for k, t in zip(req.indices, req.times)]
            out.append(Keyframes(shot=req.shot.id, frames=frames))
        return out


def previz_still_pairs(scene: ShotScene, times: list[float], width: int, height: int) -> list[int]:
    """The keyframe pairs previz draws alike, known before drawing: ``i`` where the drawings at
    ``times[i]`` and ``times[i + 1]`` are the same pixels, so their in-betweens are copies.

    A previz frame depends on its time only through where the figures stand and how
    (``stages.staging.layout``; the camera follows them, the plate is the same at every time), so
    equal layouts are equal frames: a shot with no one on screen, a frozen shot. (A title card over
    figures still moves: its plate follows them.)"""
    poses = [layout(scene.shot, t=t, width=width, height=height, speech=scene.speech, duration_s=scene.duration_s)
             for t in times]
    return [i for i in range(len(poses) - 1) if poses[i] == poses[i + 1]]


class DiffusionSettings(Record):
    """How the diffusers backend draws keyframes, plates and character sheets (the profile's
    ``[diffusers]`` table). ``PLACEMENT`` names the settings that say where and how it runs:
    they never change a pixel, so they never enter a content key."""

    PLACEMENT: ClassVar[frozenset[str]] = frozenset({"offload", "num_gpus", "batch_size", "actors", "gpu_type"})

    model: str = Field(description="Local pipeline directory, or a Hub repo id found in the local HF cache only.")
    family: str = Field("sd15", description="Architecture for throughput calibration: sd15, sdxl, qwen-image, …")
    mode: Literal["txt2img", "img2img"] = Field("img2img", description="img2img starts from the previz layout.")
    strength: float = Field(0.65, gt=0, le=1, description="img2img denoising strength.")
    steps: int = Field(4, ge=1, le=150)
    guidance_scale: float = Field(0.0, ge=0)
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    device: str = Field("cuda", description="'cuda', 'cuda:1', 'cpu', 'mps'.")
    offload: Literal["none", "model", "sequential"] = "none"
    controlnet: str | None = Field(None, description="Local ControlNet directory (e.g. lineart/canny), optional.")
    ip_adapter: str | None = Field(None, description="Local IP-Adapter weights for character consistency, optional.")
    style_prompt: str = "anime key visual, cel shading, clean line art, vibrant colors"
    negative_prompt: str = "lowres, blurry, bad anatomy, extra fingers, watermark, text, jpeg artifacts"
    characters: dict[str, str] = Field(default_factory=dict,
                                       description="Fixed description per character name, e.g. {'HANA': 'girl, orange bob hair'}.")
    layered: bool = Field(True, description="One background plate per location, characters composited over it.")
    num_gpus: float = Field(1.0, ge=0, description="GPUs per model actor; fractional shares a GPU.")
    batch_size: int = Field(4, ge=1, description="Images per model call; requests from many shots are batched.")
    actors: int = Field(1, ge=1, description="Model actors (replicas) in the pool.")
    gpu_type: str = Field("H200", description="Price-catalog GPU type billed for the actor's GPUs.")
    gen_short_side: int | None = Field(None, description="Generate at this short side, then upscale to the profile size.")
