"""Orchestration records: the profile, the render plan and the ledger.

What stages and the pipeline share (episode, shots, frames, subtitle cues, errors) lives in
``stages.records``; these records are the pipeline's own and stages never see them. Records
are frozen pydantic models; those that are stored (RenderPlan, Ledger) carry a
``schema_version``.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages.records import SCHEMA_VERSION, Record, Shot, SubtitleCue


# --------------------------------------------------------------------------- profile


class DiffusionSettings(Record):
    """How the diffusers backend draws keyframes, storyboards, plates and character sheets."""

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


class Profile(Record):
    """Everything that decides how an episode is rendered. Resolved once at the entry point."""

    name: str
    aspect: Literal["16:9", "9:16"] = "16:9"
    short_side: int = Field(360, ge=64, le=2160, description="Pixels on the short side; must be even.")
    fps: int = Field(24, ge=1, le=60)
    animate_on: int = Field(2, ge=1, le=3, description="Each drawing is held for this many frames.")
    keyframe_stride: int = Field(6, ge=1, description="Drawings from one generated keyframe to the next.")
    hold_static: bool = Field(True, description="Static shots render one keyframe and hold it.")
    backend: str = Field("previz", description="Keyframe/storyboard backend.")
    interpolation: str = Field("flow", description="In-betweener: flow, crossfade or rife.")
    flow_preset: Literal["ultrafast", "fast", "medium"] = "medium"
    crf: int = Field(23, ge=0, le=51)
    x264_preset: str = "veryfast"
    storyboard_width: int = Field(480, ge=64, description="Width of one storyboard panel in pixels.")
    audit: bool = Field(True, description="Draw one in-between per shot with the keyframe backend and "
                        "measure the in-betweener against it (PSNR, SSIM).")
    rife_weights: str | None = Field(None, description="RIFE 4.x flownet.pkl, for interpolation = 'rife'.")
    approval_gate: bool = Field(False, description="Spend keyframe money only on shots whose storyboard "
                                "panel was approved with `anim approve`.")
    diffusion: DiffusionSettings | None = Field(None, description="Settings of the diffusers backend.")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, both even, as the H.264 encoder requires."""
        short = self.short_side - self.short_side % 2
        long = int(round(short * 16 / 9))
        long -= long % 2
        return (long, short) if self.aspect == "16:9" else (short, long)


# --------------------------------------------------------------------------- plan


class ShotPlan(Record):
    shot: Shot
    scene_heading: str
    location: str
    setting: Literal["INT", "EXT", "INT/EXT"] | None = None
    time_of_day: str
    start_frame: int = Field(description="First frame of the shot in the episode timeline.")
    frames: int
    drawings: list[int] = Field(description="Shot-local frame indices where a new drawing starts.")
    keyframes: list[int] = Field(description="Shot-local frame indices of generated keyframes.")
    held_frames: int = Field(description="Frames that repeat the drawing before them.")
    audit_frame: int | None = Field(None, description="In-between drawing the keyframe backend also draws, "
                                    "to measure in-betweening fidelity; None when the shot has no in-betweens.")
    keys: dict[str, str] = Field(description="Content key per stage (sha256 hex).")
    estimate_seconds: dict[str, float] = Field(description="Estimated compute seconds per stage.")
    estimate_yuan: dict[str, float] = Field(description="Estimated cost per stage in yuan.")

    @property
    def keyframe_times(self) -> list[float]:
        """Keyframe positions as a fraction of the shot, 0.0 … 1.0."""
        last = max(self.frames - 1, 1)
        return [k / last for k in self.keyframes]


class RenderPlan(Record):
    schema_version: int = SCHEMA_VERSION
    title: str
    source: str
    script_sha256: str
    profile: Profile
    width: int
    height: int
    shots: list[ShotPlan]
    subtitles: list[SubtitleCue]
    assemble_key: str
    sheets: dict[str, str] = Field(default_factory=dict,
                                   description="Character sheet content key per character (layered diffusers).")
    episode_estimate_seconds: dict[str, float] = Field(
        description="Estimated seconds of episode-level nodes: assemble, and background plates when layered.")
    episode_estimate_yuan: dict[str, float]

    @property
    def assemble_estimate_yuan(self) -> float:
        return self.episode_estimate_yuan.get("assemble", 0.0)

    @property
    def total_frames(self) -> int:
        return sum(s.frames for s in self.shots)

    @property
    def duration_s(self) -> float:
        return self.total_frames / self.profile.fps

    @property
    def total_keyframes(self) -> int:
        return sum(len(s.keyframes) for s in self.shots)

    @property
    def estimated_cost_yuan(self) -> float:
        return sum(sum(s.estimate_yuan.values()) for s in self.shots) + sum(self.episode_estimate_yuan.values())

    def estimate_by_stage(self, what: Literal["yuan", "seconds"] = "yuan") -> dict[str, float]:
        """Estimated yuan (or resource-seconds) per stage, over every shot and the episode nodes."""
        parts = [s.estimate_yuan if what == "yuan" else s.estimate_seconds for s in self.shots]
        parts.append(self.episode_estimate_yuan if what == "yuan" else self.episode_estimate_seconds)
        out: dict[str, float] = {}
        for part in parts:
            for stage, value in part.items():
                out[stage] = out.get(stage, 0.0) + value
        return out


# --------------------------------------------------------------------------- ledger


class LedgerRecord(Record):
    """One executed (or cached) node's measured cost."""

    stage: str
    shot: str | None
    seconds: float = Field(description="Wall seconds the node held its resources.")
    resource: str = Field(description="Price-catalog resource, e.g. 'cpu' or 'gpu:H200'.")
    units: float = Field(description="How many of the resource the node held (cores, GPUs).")
    yuan: float
    cached: bool = False


class Ledger(Record):
    schema_version: int = SCHEMA_VERSION
    records: list[LedgerRecord]

    @property
    def total_yuan(self) -> float:
        return sum(r.yuan for r in self.records)

    def by_stage(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.records:
            out[r.stage] = out.get(r.stage, 0.0) + r.yuan
        return out
