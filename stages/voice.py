"""Voice: every dialogue line becomes speech in its character's voice, as a WAV with its measured
span and loudness envelope.

The embedded default speaks with eSpeak NG, offline and without weights: the library and its
data come from the ``espeakng-loader`` wheel (``libespeak-ng.so`` + ``espeak-ng-data``, English
and Mandarin among its languages), driven here through ``ctypes`` in synchronous mode with a
synthesis callback that collects the samples. The pipeline passes the library and data paths in
(``pipeline.registry``); this stage reads no environment and no config.

A character's voice is a ``CharacterVoice`` (variant, pitch, rate, language); characters the
profile does not name get a distinct voice derived from the name, so two speakers never sound
alike by accident and the same name always sounds the same. No shipped backend clones a voice
from a reference recording yet (a cloning backend would add that field to its own settings).
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import re
import threading
import wave
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from stages.records import Record, Speech, StageError, VoiceLine

VERSION = "1"
STAGE = "voice"
ENVELOPE_HZ = 50.0
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_HANGUL = re.compile(r"[\uac00-\ud7af]")
# eSpeak voice variants (espeak-ng-data/voices/!v), alternating so neighbouring names differ.
_VARIANTS = ("m3", "f2", "m1", "f4", "m7", "f1", "m2", "f3", "m5", "f5")


class CharacterVoice(Record):
    """How one character speaks. Unset fields take the backend's defaults or the derived voice."""

    variant: str | None = Field(None, description="eSpeak variant (voices/!v), e.g. 'f2', 'm3'.")
    pitch: int | None = Field(None, ge=0, le=100, description="Base pitch, 0…100 (eSpeak's scale; 50 is normal).")
    rate: int | None = Field(None, ge=80, le=450, description="Words per minute.")
    language: str | None = Field(None, description="Language the backend speaks the lines in: 'en', 'cmn', 'ja'.")


class EspeakSettings(Record):
    """The ``[espeak]`` table of a profile."""

    rate: int = Field(165, ge=80, le=450, description="Words per minute for every character without its own.")
    voices: dict[str, CharacterVoice] = Field(default_factory=dict, description="Per character (cue name).")


class NeuralCharacterVoice(Record):
    """How one character speaks with a neural model."""

    speaker: int | None = Field(None, ge=0, description="Speaker id of a multi-speaker model.")
    rate: float | None = Field(None, gt=0.2, le=4.0, description="Speaking rate, 1.0 the model's own.")


class NeuralVoiceSettings(Record):
    """The ``[neural]`` table: a neural text-to-speech model from a local directory, loaded once per
    model actor (``stages.voice_neural``). ``PLACEMENT`` never enters a content key."""

    PLACEMENT: ClassVar[frozenset[str]] = frozenset({"num_gpus", "gpu_type"})
    model: str = Field(description="A local transformers text-to-waveform model directory (VITS / MMS-TTS): "
                       "config.json, weights and tokenizer files. Never downloaded.")
    device: str = Field("cuda", description="'cuda', 'cuda:1' or 'cpu'.")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    rate: float = Field(1.0, gt=0.2, le=4.0, description="Speaking rate for every character without its own.")
    voices: dict[str, NeuralCharacterVoice] = Field(default_factory=dict, description="Per character (cue name).")
    num_gpus: float = Field(1.0, ge=0, description="GPUs per voice actor; fractional shares a GPU.")
    gpu_type: str = Field("H200", description="Price-catalog GPU type billed for the actor's GPUs.")


def language_of(text: str) -> str:
    """The language eSpeak should read ``text`` in: Japanese when it has kana, Korean for hangul,
    Mandarin for other Han characters, else English."""
    if _KANA.search(text):
        return "ja"
    if _HANGUL.search(text):
        return "ko"
    return "cmn" if _CJK.search(text) else "en"


def derived_voice(name: str) -> CharacterVoice:
    """A distinct, stable voice for a character the profile does not describe."""
    h = int.from_bytes(hashlib.sha256(name.strip().upper().encode("utf-8")).digest()[:4], "big")
    return CharacterVoice(variant=_VARIANTS[h % len(_VARIANTS)], pitch=35 + (h >> 8) % 31)


def voice_for(settings: EspeakSettings, line: VoiceLine) -> CharacterVoice:
    """The character's voice: the profile's fields over the derived ones, language from the text."""
    base = derived_voice(line.character)
    own = settings.voices.get(line.character, CharacterVoice())
    merged = {**base.model_dump(), **own.model_dump(exclude_none=True)}
    merged["rate"] = merged["rate"] or settings.rate
    merged["language"] = merged["language"] or line.language
    return CharacterVoice(**merged)


def measure(samples: np.ndarray, sample_rate: int) -> Speech:
    """The voiced span and the normalised RMS envelope of mono int16 ``samples``."""
    x = samples.astype(np.float32) / 32768.0
    hop = max(int(sample_rate / ENVELOPE_HZ), 1)
    n = max(-(-len(x) // hop), 1)  # the last window padded with silence
    frames = np.pad(x, (0, n * hop - len(x))).reshape(n, hop)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    peak = float(rms.max()) if rms.size else 0.0
    env = rms / peak if peak > 0 else rms
    voiced = np.flatnonzero(env > 0.05)
    start = float(voiced[0] * hop / sample_rate) if voiced.size else 0.0
    end = float(min((voiced[-1] + 1) * hop, len(x)) / sample_rate) if voiced.size else 0.0
    return Speech(sample_rate=sample_rate, duration_s=len(x) / sample_rate, speech_start_s=math.floor(start * 1e4) / 1e4,
                  speech_end_s=math.floor(end * 1e4) / 1e4, envelope_hz=ENVELOPE_HZ,
                  envelope=[round(float(v), 3) for v in env])


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Mono 16-bit PCM."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """(mono int16 samples, sample rate) of a 16-bit PCM WAV (a stereo file is averaged)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise StageError(STAGE, None, f"{path}: expected 16-bit PCM, got {8 * w.getsampwidth()}-bit")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        channels, rate = w.getnchannels(), w.getframerate()
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return data, rate


# --------------------------------------------------------------------------- eSpeak NG through ctypes

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_espeakRATE, _espeakPITCH = 1, 3
_espeakCHARS_UTF8, _POS_CHARACTER = 1, 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_LOCK = threading.Lock()  # the library is one state machine per process: one synthesis at a time


class EspeakVoice:
    """The embedded voice backend: eSpeak NG from ``library`` (libespeak-ng.so) with ``data``
    (espeak-ng-data). Loads the library once; ``__call__`` speaks one line into a WAV file."""

    def __init__(self, *, library: str, data: str, settings: EspeakSettings):
        self.settings = settings
        if not Path(library).is_file():
            raise StageError(STAGE, None, f"eSpeak NG library not found at {library} (pip install espeakng-loader)")
        if not (Path(data) / "phontab").is_file():
            raise StageError(STAGE, None, f"eSpeak NG data not found at {data}: no phontab there")
        self.lib = ctypes.CDLL(library)
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept alive as long as the library may call it
        with _LOCK:
            self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), 0)
            if self.sample_rate <= 0:
                raise StageError(STAGE, None, f"eSpeak NG did not initialise with data {data} "
                                 f"(espeak_Initialize returned {self.sample_rate})")
            self.lib.espeak_SetSynthCallback(self._callback)

    def ready(self) -> str:
        return f"eSpeak NG at {self.sample_rate} Hz"

    def _collect(self, wav, count, events) -> int:
        if count > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def synthesize(self, line: VoiceLine) -> np.ndarray:
        """The line's samples (mono int16 at ``sample_rate``)."""
        voice = voice_for(self.settings, line)
        name = f"{voice.language}+{voice.variant}" if voice.variant else voice.language
        text = line.text.replace("\n", " ").encode("utf-8")
        with _LOCK:
            self.lib.espeak_SetSynthCallback(self._callback)
            if self.lib.espeak_SetVoiceByName(name.encode()) != 0:
                raise StageError(STAGE, line.shot, f"line {line.index + 1} ({line.character}): eSpeak has no voice "
                                 f"{name!r}; set the character's language and variant in [espeak.voices]")
            self.lib.espeak_SetParameter(_espeakRATE, int(voice.rate), 0)
            self.lib.espeak_SetParameter(_espeakPITCH, int(voice.pitch), 0)
            self._chunks = []
            err = self.lib.espeak_Synth(text, len(text) + 1, 0, _POS_CHARACTER, 0, _espeakCHARS_UTF8, None, None)
            self.lib.espeak_Synchronize()
            chunks, self._chunks = self._chunks, []
        if err != 0:
            raise StageError(STAGE, line.shot, f"line {line.index + 1} ({line.character}): eSpeak failed "
                             f"(espeak_Synth returned {err})")
        samples = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
        if not samples.size or not np.any(samples):
            raise StageError(STAGE, line.shot, f"line {line.index + 1} ({line.character}): eSpeak produced no "
                             f"sound for {line.text!r}")
        return samples

    def __call__(self, line: VoiceLine, path: str | Path) -> Speech:
        """Speak ``line`` into the WAV at ``path``; its measured span and envelope."""
        samples = self.synthesize(line)
        write_wav(path, samples, self.sample_rate)
        return measure(samples, self.sample_rate)
