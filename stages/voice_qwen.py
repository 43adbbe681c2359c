"""The production voice that clones: VibeVoice, a Qwen2.5 language model that speaks through a
next-token diffusion head and a σ-VAE acoustic tokenizer (24 kHz), loaded from local weights in
a model actor (``pipeline.nodes.VoiceWorker``), one line per call. English and Mandarin.

It is the Qwen-LM class of TTS that the issue asks for, in the model classes transformers 5.23
ships (``VibeVoiceForConditionalGeneration``, ``VibeVoiceProcessor``). Qwen3-TTS itself cannot
load here without patching its package: ``qwen-tts`` 0.1.1 fails at import under transformers 5
(``@check_model_inputs()`` called with no function), and its transformers-5 builds
(``qwen-tts-compat``, ``qwen-tts-hf``) import ``torchaudio`` for the 25 Hz tokenizer, which has no
build for our torch 2.13 (the 2.11 build's library does not load, and then transformers' own
audio imports fail with it).

A character's voice (``ClonedVoice``) is cloned from a reference recording (a local WAV; the
model needs no transcript), and speaks as one of the model's four script speakers (``Speaker 0``
… ``Speaker 3``: the checkpoints have no named preset voices). The reference's content hash, not
its path, enters the line's content key (``ClonedVoice`` serialises it so when asked for a key).
A line's sampling (the diffusion noise, the σ-VAE's noise on the reference) is seeded from the
line, without touching the process's global random state; a line is at most ``max_line_s`` long.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, PrivateAttr, SerializationInfo, field_serializer, model_validator

from stages.records import Record, Speech, StageError, VoiceLine
from stages.voice import STAGE, measure, read_wav, write_wav

VERSION = "1"
SPEAKERS = 4  # the script's speakers: "Speaker 0" … "Speaker 3"
# What a local VibeVoice checkpoint directory holds besides its weights (save_pretrained of the
# model and of its processor), each as any one of the names transformers writes.
_FILES = {"config.json": ("config.json",),
          "processor_config.json": ("processor_config.json", "preprocessor_config.json"),
          "tokenizer files": ("tokenizer.json", "tokenizer_config.json", "vocab.json")}


class ClonedVoice(Record):
    """How one character speaks with VibeVoice: cloned from ``reference``, as script speaker ``speaker``."""

    reference: str | None = Field(None, description="A local WAV (16-bit PCM, any rate; 3–30 s of the character "
                                  "speaking) the voice is cloned from. Its content, not its path, enters the key.")
    speaker: int | None = Field(None, ge=0, lt=SPEAKERS, description="Script speaker 0…3 the character speaks as; "
                                "unset: derived from the name.")
    _sha256: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _hash_reference(self) -> "ClonedVoice":
        """Read the reference once, here: a missing file is refused when the profile is read."""
        if self.reference is not None:
            path = Path(self.reference).expanduser()
            try:
                self._sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as exc:
                raise ValueError(f"reference recording {path}: {exc.strerror or 'cannot be read'}") from None
        return self

    @field_serializer("reference")
    def _content(self, value: str | None, info: SerializationInfo) -> Any:
        """A content key sees the recording's sha256; everything else (config.json) sees the path."""
        if value is not None and (info.context or {}).get("content_key"):
            return {"sha256": self._sha256}
        return value

    @property
    def sha256(self) -> str | None:
        return self._sha256


class VibeVoiceSettings(Record):
    """The ``[vibevoice]`` table: a local VibeVoice checkpoint, loaded once per model actor.
    ``PLACEMENT`` never enters a content key."""

    PLACEMENT: ClassVar[frozenset[str]] = frozenset({"num_gpus", "gpu_type"})
    model: str = Field(description="A local VibeVoice checkpoint directory in transformers' format (VibeVoice-1.5B-hf "
                       "or -7B-hf: config.json, weights, processor and tokenizer files). Never downloaded.")
    device: str = Field("cuda", description="'cuda', 'cuda:1' or 'cpu'.")
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    diffusion_steps: int = Field(10, ge=1, le=100, description="Denoising steps per acoustic latent.")
    max_line_s: float = Field(30.0, gt=0.0, le=600.0, description="The longest a line may speak, seconds.")
    voices: dict[str, ClonedVoice] = Field(default_factory=dict, description="Per character (cue name).")
    num_gpus: float = Field(1.0, ge=0, description="GPUs per voice actor; fractional shares a GPU.")
    gpu_type: str = Field("H200", description="Price-catalog GPU type billed for the actor's GPUs.")


def speaker_of(character: str, voice: ClonedVoice | None) -> int:
    """The character's script speaker: its own, else one derived from the name (stable, spread)."""
    if voice is not None and voice.speaker is not None:
        return voice.speaker
    return int.from_bytes(hashlib.sha256(character.strip().upper().encode("utf-8")).digest()[:4], "big") % SPEAKERS


class VibeVoiceTTS:
    """VibeVoice from ``settings.model`` on ``settings.device``; ``__call__`` speaks one line."""

    def __init__(self, *, settings: VibeVoiceSettings):
        import torch  # torch and transformers are imported only when the backend is built
        from transformers import AutoConfig, AutoProcessor, VibeVoiceForConditionalGeneration

        # 1. The directory: present and complete, or one line naming it.
        self.settings, self._torch = settings, torch
        path = Path(settings.model).expanduser()
        missing = [what for what, names in _FILES.items() if not any((path / n).is_file() for n in names)]
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            missing.append("weights (*.safetensors)")
        if missing:
            state = "not found" if not path.is_dir() else f"incomplete (no {', '.join(missing)})"
            raise StageError(STAGE, None, f"VibeVoice model {state} at {path}: expected a local VibeVoice checkpoint "
                             "directory in transformers' format (weights are never downloaded); set [vibevoice] model, "
                             "or use voice = \"espeak\"")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type != "vibevoice":
            raise StageError(STAGE, None, f"VibeVoice model at {path} is a {config.model_type!r} model; this backend "
                             "loads VibeVoice checkpoints (VibeVoiceForConditionalGeneration)")
        if settings.device.startswith("cuda") and not torch.cuda.is_available():
            raise StageError(STAGE, None, f"[vibevoice] device = {settings.device!r}: no CUDA device here")
        # 2. The processor (tokenizer, chat template, feature extractor) and the model, once.
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            self.model = VibeVoiceForConditionalGeneration.from_pretrained(
                path, local_files_only=True, dtype=getattr(torch, settings.dtype)).to(settings.device).eval()
        except (OSError, ValueError, ImportError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StageError(STAGE, None, f"VibeVoice model at {path} did not load: {first}") from None
        self.sample_rate = int(self.processor.feature_extractor.sampling_rate)
        self.hop = int(self.model.config.audio_config.hop_length)
        self._references: dict[str, np.ndarray] = {}

    def ready(self) -> str:
        return f"VibeVoice from {self.settings.model} on {self.settings.device} at {self.sample_rate} Hz"

    def reference(self, voice: ClonedVoice, line: VoiceLine) -> np.ndarray:
        """The reference recording as float32 mono at the model's rate (read once per actor)."""
        ref = str(voice.reference)
        if ref not in self._references:
            path = Path(ref).expanduser()
            if not path.is_file():
                raise StageError(STAGE, line.shot, f"line {line.index + 1} ({line.character}): reference recording "
                                 f"{path} not found")
            if hashlib.sha256(path.read_bytes()).hexdigest() != voice.sha256:  # the key holds what was read
                raise StageError(STAGE, line.shot, f"line {line.index + 1} ({line.character}): reference recording "
                                 f"{path} changed since the profile was read; plan and render again")
            samples, rate = read_wav(path)
            x = samples.astype(np.float32) / 32768.0
            if rate != self.sample_rate:
                from scipy.signal import resample_poly

                g = math.gcd(rate, self.sample_rate)
                x = resample_poly(x, self.sample_rate // g, rate // g).astype(np.float32)
            self._references[ref] = x
        return self._references[ref]

    def synthesize(self, line: VoiceLine) -> np.ndarray:
        """The line's samples (mono int16 at ``sample_rate``)."""
        torch = self._torch
        who = f"line {line.index + 1} ({line.character})"
        # 1. The prompt: the line as the character's script speaker, with its reference to clone.
        own = self.settings.voices.get(line.character)
        content: list[dict[str, Any]] = [{"type": "text", "text": " ".join(line.text.split())}]
        if own is not None and own.reference is not None:
            content.append({"type": "audio", "audio": self.reference(own, line)})
        conversation = [{"role": str(speaker_of(line.character, own)), "content": content}]
        inputs = self.processor.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                                    return_tensors="pt")
        # The reference's samples in the model's dtype (a bfloat16 model's first convolution refuses float32).
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)
        # 2. Generate, seeded from the line; the global RNG is left as it was.
        seed = int.from_bytes(hashlib.sha256(f"{line.character}\n{line.text}".encode()).digest()[:8], "big") >> 1
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        longest = max(1, math.ceil(self.settings.max_line_s * self.sample_rate / self.hop))
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            out = self.model.generate(**inputs, max_new_tokens=longest, num_diffusion_steps=self.settings.diffusion_steps,
                                      return_dict_in_generate=True)
        audio = out.audio[0]
        if audio is None or audio.numel() == 0:
            raise StageError(STAGE, line.shot, f"{who}: the model produced no sound for {line.text!r}")
        # 3. 16-bit PCM, clipped (never amplified: the mix sets the loudness).
        x = audio.float().reshape(-1).cpu().numpy()
        if not np.isfinite(x).all() or not np.any(x):
            raise StageError(STAGE, line.shot, f"{who}: the model produced no sound")
        return np.round(np.clip(x, -1.0, 1.0) * 32767).astype(np.int16)

    def __call__(self, line: VoiceLine, path: str | Path) -> Speech:
        """Speak ``line`` into the WAV at ``path``; its measured span and envelope."""
        samples = self.synthesize(line)
        write_wav(path, samples, self.sample_rate)
        return measure(samples, self.sample_rate)
