"""Orchestration records: the profile, the render plan and the ledger.

What stages and the pipeline share (episode, shots, frames, subtitle cues, errors) lives in
``stages.records``; these records are the pipeline's own and stages never see them. Records
are frozen pydantic models; those that are stored (RenderPlan, Ledger) carry a
``schema_version``.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializeAsAny, ValidationError, model_validator

from pipeline import registry
from stages.records import (SCHEMA_VERSION, KeyframeRequest, ProfileError, Record, Shot, ShotScene, SubtitleCue,
                            VoiceLine)
from stages.script import MAX_SHORT_SIDE, MAX_STORYBOARD_WIDTH


# --------------------------------------------------------------------------- profile


class Profile(Record):
    """Everything that decides how an episode is rendered. Resolved once at the entry point.

    ``storyboard``, ``backend`` (keyframes) and ``interpolation`` select one registered backend
    each (``pipeline.registry``); a selected backend's settings come from the profile's table
    named after it (``[diffusers]``, ``[flow]``, ``[rife]``) and are validated by its own model.
    """

    name: str
    aspect: Literal["16:9", "9:16"] = "16:9"
    short_side: int = Field(360, ge=64, le=MAX_SHORT_SIDE, description="Pixels on the short side; must be even.")
    fps: int = Field(24, ge=1, le=60)
    animate_on: int = Field(2, ge=1, le=3, description="Each drawing is held for this many frames.")
    keyframe_stride: int = Field(6, ge=1, description="Drawings from one generated keyframe to the next.")
    hold_static: bool = Field(True, description="Static shots render one keyframe and hold it.")
    storyboard: str = Field("previz", description="Storyboard backend.")
    backend: str = Field("previz", description="Keyframe backend: previz or diffusers.")
    interpolation: str = Field("flow", description="In-betweener: flow, crossfade or rife.")
    voice: str = Field("espeak", description="Voice backend: espeak (embedded, offline) or neural (local weights).")
    breath_s: float = Field(0.3, ge=0.0, le=5.0, description="Pause after each spoken line, before the next "
                            "line or the cut: a shot lasts at least its lines as spoken plus this.")
    loudness_lufs: float = Field(-16.0, ge=-40.0, le=-5.0, description="Delivery loudness, integrated "
                                 "(BS.1770-4): -16 for mobile platforms, -23 for EBU R128 broadcast.")
    music: str | None = Field(None, description="A local music or ambience file under the dialogue "
                              "(else the script's title page 'Music:', relative to the script).")
    music_db: float = Field(-12.0, ge=-60.0, le=0.0, description="The bed's level against the dialogue, dB.")
    duck_db: float = Field(10.0, ge=0.0, le=40.0, description="How far the bed ducks under speech, dB.")
    burn_subtitles: bool = Field(True, description="Also deliver episode_subtitled.mp4 with the subtitles "
                                 "burned in (the usual form for 9:16 platforms).")
    crf: int = Field(23, ge=0, le=51)
    x264_preset: str = "veryfast"
    storyboard_width: int = Field(480, ge=64, le=MAX_STORYBOARD_WIDTH,
                                  description="Width of one storyboard panel in pixels.")
    audit: bool = Field(True, description="Draw one in-between per shot with the keyframe backend and "
                        "measure the in-betweener against it (PSNR, SSIM).")
    approval_gate: bool | None = Field(None, description="Spend keyframe money only on shots whose storyboard "
                                       "panel was approved with `anim approve`; None: on when the keyframe "
                                       "backend runs on GPUs. `--approval-gate/--no-approval-gate` overrides it.")
    settings: dict[str, SerializeAsAny[Record]] = Field(
        default_factory=dict, description="Per stage, the selected backend's settings (from its table).")

    @model_validator(mode="before")
    @classmethod
    def _backend_tables(cls, data: Any) -> Any:
        """Validate each selected backend's table with its own settings model."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        given = dict(data.pop("settings", None) or {})  # a dumped profile: stage -> settings
        tables = {k: data.pop(k) for k in list(data) if k not in cls.model_fields}
        known = {b.name for b in registry.all_backends()}
        for key in tables:
            if key not in known:
                hint = f" (moved: {MOVED[key]})" if key in MOVED else ""
                raise ProfileError(f"unknown profile field or table {key!r}{hint}; backend tables: "
                                   f"{', '.join(sorted(known))}")
        settings = {}
        for stage, selector in registry.SELECTOR.items():
            name = data.get(selector, cls.model_fields[selector].default)
            if not isinstance(name, str):  # `--set storyboard=[]` (found by tests/test_fuzz.py)
                raise ProfileError(f"{selector} = {name!r}: expected a backend name; known: "
                                   f"{', '.join(registry.names(stage))}")
            entry = registry.get(stage, name)
            raw = given.get(stage, tables.get(entry.name, {}))
            settings[stage] = raw if isinstance(raw, entry.settings) else _settings(entry, raw)
        data["settings"] = settings
        return data

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, both even, as the H.264 encoder requires."""
        short = self.short_side - self.short_side % 2
        long = int(round(short * 16 / 9))
        long -= long % 2
        return (long, short) if self.aspect == "16:9" else (short, long)

    def entry(self, stage: str) -> registry.Backend:
        """The registry entry of the backend this profile selects for ``stage``."""
        return registry.get(stage, getattr(self, registry.SELECTOR[stage]))

    def settings_for(self, stage: str) -> Any:
        return self.settings[stage]

    def resources(self, stage: str) -> registry.Resources:
        return self.entry(stage).resources(self.settings[stage])

    def replace(self, **changes: Any) -> "Profile":
        """A validated copy with ``changes``; a stage whose backend changes gets that backend's
        defaults unless its table is among the changes."""
        data = self.model_dump()
        for stage, selector in registry.SELECTOR.items():
            if selector in changes and changes[selector] != data[selector]:
                del data["settings"][stage]
        return Profile.model_validate({**data, **changes})

    def with_settings(self, stage: str, **changes: Any) -> "Profile":
        """A validated copy with ``changes`` to the settings of ``stage``'s backend."""
        data = self.model_dump()
        data["settings"][stage] = {**data["settings"][stage], **changes}
        return Profile.model_validate(data)

    def toml_data(self) -> dict[str, Any]:
        """The profile as a TOML file writes it: fields, then one table per selected backend."""
        data = self.model_dump(exclude={"settings"}, exclude_none=True)
        for stage, settings in self.settings.items():
            table = settings.model_dump(exclude_none=True)
            if table:
                data[getattr(self, registry.SELECTOR[stage])] = table
        return data


# Profile fields that became a backend's table: named in the error an old profile gets.
MOVED = {"flow_preset": "[flow] preset", "rife_weights": "[rife] weights", "diffusion": "the [diffusers] table"}


def _settings(entry: registry.Backend, raw: Any) -> Record:
    if not isinstance(raw, dict):
        raise ProfileError(f"[{entry.name}]: expected a table of {entry.stage} settings, got {raw!r}")
    try:
        return entry.settings(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ProfileError(f"[{entry.name}] {where}: {err['msg']} (got {err.get('input')!r})") from None


# --------------------------------------------------------------------------- plan


class VoicePlan(Record):
    """One dialogue line's voice node: its key, the line, and where its speech sits in the cut."""

    id: str = Field(description="'<shot>#<n>', n the line's 1-based position in the shot.")
    key: str
    line: VoiceLine
    start_s: float = Field(description="Where the line's WAV starts on the episode timeline.")
    spoken_s: float = Field(description="Its length: the WAV's measured duration, or the reading-speed estimate.")
    measured: bool = Field(description="spoken_s (and the cue) come from the voice node's WAV.")
    estimate_seconds: float = 0.0
    estimate_yuan: float = 0.0


class Bed(Record):
    """The music or ambience file under the dialogue: its path and its content's sha256."""

    path: str
    sha256: str


def shot_time(frame: int, frames: int) -> float:
    """Frame ``frame`` of a shot of ``frames`` frames as a position in the shot, 0.0 … 1.0."""
    return frame / max(frames - 1, 1)


class ShotPlan(Record):
    scene: ShotScene = Field(description="The shot and the scene it sits in.")
    start_frame: int = Field(description="First frame of the shot in the episode timeline.")
    frames: int
    drawings: list[int] = Field(description="Shot-local frame indices where a new drawing starts.")
    keyframes: list[int] = Field(description="Shot-local frame indices of generated keyframes.")
    held_frames: int = Field(description="Frames that repeat the drawing before them.")
    still_pairs: list[int] = Field(default_factory=list, description="Keyframe pairs the keyframe backend draws "
                                   "alike, known from the plan (i: keyframes i and i + 1): their in-betweens are copies.")
    audit_frame: int | None = Field(None, description="In-between drawing the keyframe backend also draws, "
                                    "to measure in-betweening fidelity; None when the shot has no in-betweens.")
    seed: int = Field(description="The keyframe backend's seed, from the shot's content (not from any key).")
    keys: dict[str, str] = Field(description="Content key per node (sha256 hex): storyboard, keyframes, clip, "
                                 "and plate when the keyframe backend is layered.")
    estimate_seconds: dict[str, float] = Field(description="Estimated compute seconds per stage.")
    estimate_yuan: dict[str, float] = Field(description="Estimated cost per stage in yuan.")

    @property
    def shot(self) -> Shot:
        return self.scene.shot

    def time_of(self, frame: int) -> float:
        """A shot-local frame's position in the shot, 0.0 … 1.0."""
        return shot_time(frame, self.frames)

    @property
    def keyframe_times(self) -> list[float]:
        """Keyframe positions as a fraction of the shot, 0.0 … 1.0."""
        return [self.time_of(k) for k in self.keyframes]

    def keyframe_request(self) -> KeyframeRequest:
        """What the keyframe backend draws for this shot."""
        return KeyframeRequest(scene=self.scene, indices=self.keyframes, times=self.keyframe_times, seed=self.seed)

    def audit_request(self) -> KeyframeRequest | None:
        """The audit drawing: one in-between drawn by the keyframe backend too."""
        if self.audit_frame is None:
            return None
        return KeyframeRequest(scene=self.scene, indices=[self.audit_frame], times=[self.time_of(self.audit_frame)],
                               seed=self.seed)


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
    contact_sheet_key: str = Field(description="The storyboard contact sheet alone (a render that stops early).")
    plates: dict[str, list[str]] = Field(default_factory=dict, description="Background plate content key -> "
                                         "[location, time of day, setting] (layered keyframe backends).")
    sheets: dict[str, str] = Field(default_factory=dict,
                                   description="Character sheet content key per character (layered backends).")
    episode_estimate_seconds: dict[str, float] = Field(
        description="Estimated seconds of episode-level nodes: assemble, and background plates when layered.")
    episode_estimate_yuan: dict[str, float]
    voices: list[VoicePlan] = Field(default_factory=list, description="One voice node per dialogue line.")
    speech_timing: Literal["measured", "estimate"] = Field(
        "estimate", description="'measured': every line's length comes from its voice node; 'estimate': the "
        "reading-speed estimate, until the voice nodes exist.")
    bed: Bed | None = None

    @property
    def assemble_estimate_yuan(self) -> float:
        """The assembly node: joining the clips, the mix and the subtitles (burned in)."""
        return sum(self.episode_estimate_yuan.get(s, 0.0) for s in ("assemble", "mix", "subtitles"))

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
    method: str | None = Field(None, description="The in-betweening method of an adaptive clip's row "
                                                 "('flow', 'rife', 'fallback'); None for every other row.")
    partial: bool = Field(False, description="The time of a node attempt that did not finish (cancelled, failed or "
                                             "its worker died): billed, but calibration does not learn from it.")


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
