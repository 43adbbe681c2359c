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
import subprocess
import sys
import threading
import wave
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from stages.records import Record, Speech, StageError, VoiceLine

VERSION = "2"  # 2: a line's samples depend on the line alone
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
_LOCK = threading.Lock()  # the library is one state machine per process: one initialisation at a time
# eSpeak keeps synthesis state in process-wide statics that neither espeak_Terminate nor a new
# espeak_Initialize resets (the pitch flutter's phase among them): the same line spoken twice in
# one process comes out different, depending on everything spoken before it; and its noise
# generator is seeded from the clock. So each line is spoken by a fresh interpreter that loads the
# library, fixes the seed, speaks that one line and writes the samples to stdout: a line's WAV
# depends on the line alone (about 30 ms of start-up a line).
_SPEAK_ONE = """
import ctypes, sys
library, data, voice, rate, pitch = sys.argv[1:6]
lib = ctypes.CDLL(library)
lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                             ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
chunks = []
def collect(wav, count, events):
    if count > 0 and wav:
        chunks.append(ctypes.string_at(wav, 2 * count))
    return 0
callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)(collect)
if lib.espeak_Initialize(2, 0, data.encode(), 0) <= 0:
    sys.exit(3)
lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
lib.espeak_ng_SetRandSeed(1)  # its noise (breath, Klatt) from a fixed seed, not from the clock
lib.espeak_SetSynthCallback(callback)
if lib.espeak_SetVoiceByName(voice.encode()) != 0:
    sys.exit(4)
lib.espeak_SetParameter(1, int(rate), 0)  # espeakRATE
lib.espeak_SetParameter(3, int(pitch), 0)  # espeakPITCH
text = sys.stdin.buffer.read()
err = lib.espeak_Synth(text, len(text) + 1, 0, 1, 0, 1, None, None)  # POS_CHARACTER, espeakCHARS_UTF8
lib.espeak_Synchronize()
if err != 0:
    sys.stderr.write(f"espeak_Synth returned {err}")
    sys.exit(5)
sys.stdout.buffer.write(b"".join(chunks))
"""


class EspeakVoice:
    """The embedded voice backend: eSpeak NG from ``library`` (libespeak-ng.so) with ``data``
    (espeak-ng-data). ``__call__`` speaks one line into a WAV file; the same line always gives
    the same samples (each line is spoken in a process of its own, see ``_SPEAK_ONE``)."""

    def __init__(self, *, library: str, data: str, settings: EspeakSettings):
        self.settings, self.library, self.data = settings, library, data
        if not Path(library).is_file():
            raise StageError(STAGE, None, f"eSpeak NG library not found at {library} (pip install espeakng-loader)")
        if not (Path(data) / "phontab").is_file():
            raise StageError(STAGE, None, f"eSpeak NG data not found at {data}: no phontab there")
        lib = ctypes.CDLL(library)  # loads and initialises here (so a broken install fails now), never speaks
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        with _LOCK:
            self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), 0)
        if self.sample_rate <= 0:
            raise StageError(STAGE, None, f"eSpeak NG did not initialise with data {data} "
                             f"(espeak_Initialize returned {self.sample_rate})")

    def ready(self) -> str:
        return f"eSpeak NG at {self.sample_rate} Hz"

    def synthesize(self, line: VoiceLine) -> np.ndarray:
        """The line's samples (mono int16 at ``sample_rate``)."""
        voice = voice_for(self.settings, line)
        name = f"{voice.language}+{voice.variant}" if voice.variant else voice.language
        who = f"line {line.index + 1} ({line.character})"
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _SPEAK_ONE, self.library, self.data, name,
                               str(int(voice.rate)), str(int(voice.pitch))],
                              input=line.text.replace("\n", " ").encode("utf-8"), capture_output=True)
        if done.returncode == 4:
            raise StageError(STAGE, line.shot, f"{who}: eSpeak has no voice {name!r}; set the character's "
                             "language and variant in [espeak.voices]")
        if done.returncode != 0:
            why = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            raise StageError(STAGE, line.shot, f"{who}: eSpeak failed ({why[0]})")
        samples = np.frombuffer(done.stdout, dtype="<i2").astype(np.int16)
        if not samples.size or not np.any(samples):
            raise StageError(STAGE, line.shot, f"{who}: eSpeak produced no sound for {line.text!r}")
        return samples

    def __call__(self, line: VoiceLine, path: str | Path) -> Speech:
        """Speak ``line`` into the WAV at ``path``; its measured span and envelope."""
        samples = self.synthesize(line)
        write_wav(path, samples, self.sample_rate)
        return measure(samples, self.sample_rate)
