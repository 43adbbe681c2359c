"""The production voice backend: a neural text-to-speech model from local weights, in a model
actor on a GPU (``pipeline.nodes.VoiceWorker``), loaded once, one line per call.

It loads any transformers text-to-waveform model of the VITS family (``VitsModel``: MMS-TTS and
VITS checkpoints) from a local directory with ``local_files_only``: nothing is downloaded, and
a directory that is absent or incomplete is one error naming the path. A multi-speaker model
takes each character's ``speaker`` id; ``rate`` sets the model's speaking rate. The model's
sampling is seeded from the line (its character and text), so a line sounds the same on every
run, without touching the process's global random state.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from stages.records import Speech, StageError, VoiceLine
from stages.voice import STAGE, NeuralVoiceSettings, measure, write_wav

VERSION = "1"


class NeuralVoice:
    """A VITS-family model from ``settings.model``, on ``settings.device``."""

    def __init__(self, *, settings: NeuralVoiceSettings):
        from transformers import AutoConfig, AutoTokenizer, VitsModel

        self.settings = settings
        path = Path(settings.model).expanduser()
        if not (path / "config.json").is_file():
            raise StageError(STAGE, None, f"neural voice model not found at {path}: expected a local model directory "
                             "with config.json, weights and tokenizer files (weights are never downloaded); set "
                             "[neural] model, or use voice = \"espeak\"")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type != "vits":
            raise StageError(STAGE, None, f"neural voice model at {path} is a {config.model_type!r} model; this "
                             "backend loads VITS-family text-to-waveform models (VitsModel, MMS-TTS)")
        if settings.device.startswith("cuda") and not torch.cuda.is_available():
            raise StageError(STAGE, None, f"[neural] device = {settings.device!r}: no CUDA device here")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = VitsModel.from_pretrained(path, local_files_only=True,
                                                   dtype=getattr(torch, settings.dtype)).to(settings.device).eval()
        except (OSError, ValueError) as exc:
            raise StageError(STAGE, None, f"neural voice model at {path} did not load: {exc}") from None
        self.sample_rate = int(self.model.config.sampling_rate)

    def ready(self) -> str:
        return f"VITS from {self.settings.model} on {self.settings.device} at {self.sample_rate} Hz"

    def synthesize(self, line: VoiceLine) -> np.ndarray:
        """The line's samples (mono int16 at ``sample_rate``)."""
        own = self.settings.voices.get(line.character)
        inputs = self.tokenizer(line.text, return_tensors="pt")
        if inputs["input_ids"].shape[-1] == 0 or not bool((inputs["input_ids"] != self.tokenizer.pad_token_id).any()):
            raise StageError(STAGE, line.shot, f"line {line.index + 1} ({line.character}): the model's vocabulary "
                             f"has none of the characters of {line.text!r} (is it a model for {line.language!r}?)")
        kwargs = {}
        if own is not None and own.speaker is not None:
            if own.speaker >= self.model.config.num_speakers:
                raise StageError(STAGE, line.shot, f"line {line.index + 1} ({line.character}): speaker {own.speaker} "
                                 f"past the model's {self.model.config.num_speakers} speakers")
            kwargs["speaker_id"] = own.speaker
        self.model.speaking_rate = own.rate if own is not None and own.rate else self.settings.rate
        seed = int.from_bytes(hashlib.sha256(f"{line.character}\n{line.text}".encode()).digest()[:8], "big") >> 1
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():  # the global RNG is left as it was
            torch.manual_seed(seed)
            wave = self.model(**{k: v.to(self.model.device) for k, v in inputs.items()}, **kwargs).waveform
        x = wave[0].float().cpu().numpy()
        peak = float(np.abs(x).max()) if x.size else 0.0
        if peak == 0.0 or not np.isfinite(peak):
            raise StageError(STAGE, line.shot, f"line {line.index + 1} ({line.character}): the model produced no "
                             "sound")
        return np.round(np.clip(x / max(peak, 1.0), -1.0, 1.0) * 32767).astype(np.int16)

    def __call__(self, line: VoiceLine, path: str | Path) -> Speech:
        samples = self.synthesize(line)
        write_wav(path, samples, self.sample_rate)
        return measure(samples, self.sample_rate)
