"""The records stages and the pipeline share, and the project's error hierarchy.

Dependency-free (pydantic and numpy only): every module of ``stages/`` and ``pipeline/`` may
import it, and it imports neither. Records are frozen pydantic models; those that are stored
carry a ``schema_version``. Image-carrying records are plain dataclasses holding numpy arrays,
since they travel through Ray's object store and are never serialised as JSON.

Each stage takes a narrow input of its own: ``ShotScene`` is what any drawing of a shot needs
(the shot and the scene it sits in), ``KeyframeRequest`` what one shot's keyframe drawing
needs (which frames, where in the shot, the seed). ``pipeline/`` builds them from the plan;
stages never see plans, content keys or estimates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- errors


class AnimError(Exception):
    """Base of every error the pipeline reports to a user.

    Every message names the file (and line, where there is one) and the problem, and says
    what state was left behind, so the CLI can print it as one line without a traceback.
    Errors survive a pickle round trip (they cross Ray's worker boundary): subclasses with
    their own ``__init__`` arguments keep them in ``args``.
    """


class ScriptError(AnimError):
    """A screenplay or shot list that cannot be turned into an episode."""

    def __init__(self, path: str, problem: str, line: int | None = None):
        self.path, self.problem, self.line = path, problem, line
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        return type(self), (self.path, self.problem, self.line)


class ProfileError(AnimError):
    """A profile file or override that does not describe a valid render."""


class StageError(AnimError):
    """A stage failed while rendering; carries a failed subprocess's stderr when there is one.

    ``transient``: the failure says nothing about the input (an encoder killed by a signal), so
    the same node run again may succeed; a deterministic failure (ffmpeg rejecting its
    arguments, a frame of the wrong shape) is not."""

    def __init__(self, stage: str, shot: str | None, problem: str, stderr: str = "", transient: bool = False):
        self.stage, self.shot, self.problem, self.stderr, self.transient = stage, shot, problem, stderr, transient
        where = f"{stage}[{shot}]" if shot else stage
        tail = f"\n{stderr.strip()[-2000:]}" if stderr.strip() else ""
        super().__init__(f"{where}: {problem}{tail}")

    def __reduce__(self):
        return type(self), (self.stage, self.shot, self.problem, self.stderr, self.transient)


class NodeError(AnimError):
    """A node of the render graph failed. Names the node (stage and shot, or what it was for);
    ``remote_traceback`` is the chained traceback as the worker saw it (printed with
    ``--debug``), since the exception object itself crosses a process boundary."""

    def __init__(self, node: str, problem: str, remote_traceback: str = ""):
        self.node, self.problem, self.remote_traceback = node, problem, remote_traceback
        super().__init__(f"{node}: {problem}")

    def __reduce__(self):
        return type(self), (self.node, self.problem, self.remote_traceback)


class TransientNodeError(NodeError):
    """A node failed for a reason that says nothing about its input (its encoder was killed, the
    store did not answer): the executor runs it again, a bounded number of times."""


# --------------------------------------------------------------------------- episode


class Camera(str, Enum):
    """Shot framing, from widest to tightest."""

    ESTABLISHING = "establishing"
    WIDE = "wide"
    MEDIUM = "medium"
    CLOSE_UP = "close-up"
    EXTREME_CLOSE_UP = "extreme-close-up"


class DialogueLine(Record):
    character: str = Field(description="Canonical cue name without extension, e.g. 'BOB' or '林小雨'.")
    text: str
    parenthetical: str | None = None
    extension: str | None = Field(None, description="Cue extension such as 'V.O.', 'O.S.', \"CONT'D\".")
    dual: bool = Field(False, description="Spoken simultaneously with the previous line (Fountain '^').")
    line: int = Field(description="1-based line of the cue in the source file.")


class Shot(Record):
    id: str = Field(description="Stable id within the episode, e.g. 'sc01-sh03'.")
    scene: int = Field(description="1-based index of the scene the shot belongs to.")
    camera: Camera
    duration_s: float = Field(gt=0)
    characters: list[str] = Field(description="Characters on screen, in order of appearance.")
    action: str = Field(description="What happens on screen; may be empty for a pure dialogue shot.")
    dialogue: list[DialogueLine] = Field(default_factory=list)
    static: bool = Field(False, description="Nothing moves: render one drawing and hold it.")
    line: int = Field(description="1-based line in the source where the shot starts.")
    title: str | None = Field(None, description="Centred text the shot shows as a title card (Fountain '>THE END<').")
    transition_in: str | None = Field(None, description="Transition written before the shot that brings it in, "
                                                        "e.g. 'FADE IN:' (only where no shot precedes it or it fades in).")
    transition_out: str | None = Field(None, description="Transition written after the shot, e.g. 'CUT TO:', 'FADE OUT.'.")


class Scene(Record):
    index: int
    heading: str
    location: str
    setting: Literal["INT", "EXT", "INT/EXT"] | None = None
    time_of_day: str = Field("DAY", description="Upper-case, e.g. DAY, NIGHT, DUSK, DAWN.")
    number: str | None = Field(None, description="Scene number from '#12A#', if given.")
    line: int
    shots: list[Shot]


class Episode(Record):
    schema_version: int = SCHEMA_VERSION
    title: str
    source: str = Field(description="Path of the script the episode was parsed from.")
    title_page: dict[str, str] = Field(default_factory=dict)
    characters: list[str] = Field(default_factory=list)
    scenes: list[Scene]

    @property
    def shots(self) -> list[Shot]:
        return [shot for scene in self.scenes for shot in scene.shots]

    @property
    def duration_s(self) -> float:
        return sum(shot.duration_s for shot in self.shots)


class SubtitleCue(Record):
    index: int
    start_s: float
    end_s: float
    character: str
    text: str
    shot: str
    speech_start_s: float | None = Field(None, description="When the line's voice starts on the episode "
                                         "timeline (measured from its WAV); None while the cut uses the "
                                         "reading-speed estimate.")
    speech_end_s: float | None = Field(None, description="When the line's voice ends (measured).")


# --------------------------------------------------------------------------- sound


class VoiceLine(Record):
    """One dialogue line for a voice backend: what is said, by whom, in which language."""

    shot: str
    index: int = Field(description="The line's position in the shot's dialogue, 0-based.")
    character: str
    text: str
    language: str = Field(description="BCP-47-ish language of the text as the backend names it: 'en', 'cmn'.")


class Speech(Record):
    """A spoken line as its WAV holds it (mono, 16-bit PCM): measured, not estimated."""

    sample_rate: int
    duration_s: float = Field(description="Length of the WAV.")
    speech_start_s: float = Field(description="First voiced sample (above the envelope's floor), from the WAV's start.")
    speech_end_s: float = Field(description="Last voiced sample.")
    envelope_hz: float = Field(description="Rate of ``envelope``: values per second.")
    envelope: list[float] = Field(description="Speech loudness 0…1 (RMS, normalised to the line's peak), for mouths.")

    @property
    def spoken_s(self) -> float:
        return self.speech_end_s - self.speech_start_s


class AudioStem(Record):
    """An audio file of the episode's mix, on the episode timeline: the dialogue stem, the
    music/ambience bed, the final mix. ``path`` is the file's name inside the episode's
    artifact (``dialogue.wav``, ``music.wav``, ``mix.m4a``) — the publish step copies them
    beside ``episode.mp4``."""

    name: Literal["dialogue", "music", "mix"]
    path: str
    start_s: float = 0.0
    duration_s: float
    loudness_lufs: float | None = Field(None, description="Integrated loudness, BS.1770-4 (pyloudnorm).")


# --------------------------------------------------------------------------- stage inputs


class SpokenLine(Record):
    """A line's voice as the drawing of its shot sees it: who, from when, how loud over time."""

    character: str
    start_s: float = Field(description="Where the line's speech starts, seconds from the shot's start.")
    envelope_hz: float
    envelope: list[float] = Field(description="Speech loudness 0…1 at envelope_hz, from start_s.")

    def level(self, t_s: float) -> float | None:
        """The speech level at ``t_s`` seconds into the shot; None outside the line."""
        i = int((t_s - self.start_s) * self.envelope_hz)
        return self.envelope[i] if 0 <= i < len(self.envelope) else None


class ShotScene(Record):
    """A shot in the scene it sits in: what any drawing of the shot needs."""

    shot: Shot
    heading: str = Field(description="The scene heading, e.g. 'INT. SCHOOL ROOFTOP - DAY'.")
    location: str
    setting: Literal["INT", "EXT", "INT/EXT"] | None = None
    time_of_day: str
    speech: list[SpokenLine] = Field(default_factory=list, description="Measured voices of the shot's lines "
                                     "(mouths follow them); empty while the cut uses the reading-speed estimate.")
    duration_s: float | None = Field(None, description="The shot's length in the cut (at least its lines as "
                                     "spoken), when it differs from the script's.")


class KeyframeRequest(Record):
    """One shot's drawings for a keyframe backend: which frames, where in the shot, which seed."""

    scene: ShotScene
    indices: list[int] = Field(description="Shot-local frame index of each drawing.")
    times: list[float] = Field(description="Each drawing's position in the shot, 0.0 … 1.0.")
    seed: int = Field(ge=0, description="Derived from the shot's content: the same shot draws the same pixels.")

    @property
    def shot(self) -> Shot:
        return self.scene.shot


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Frame:
    """One image of a shot: RGB uint8, shape (height, width, 3)."""

    index: int
    image: np.ndarray


@dataclass(frozen=True)
class Keyframes:
    """The generated drawings of one shot, at shot-local frame indices."""

    shot: str
    frames: list[Frame] = field(default_factory=list)
