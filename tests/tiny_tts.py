"""A tiny random-weight VITS text-to-speech model built in code and saved with ``save_pretrained``:
the real transformers ``VitsModel`` and ``VitsTokenizer`` at toy size (no downloads, no weights
from anywhere), two speakers, a character vocabulary of lower-case Latin letters. The saved
directory loads exactly like an MMS-TTS checkpoint, through ``stages.voice_neural.NeuralVoice``."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import VitsConfig, VitsModel, VitsTokenizer

CHARS = list(" abcdefghijklmnopqrstuvwxyz'.,?!")


def save_vits(path: Path, *, speakers: int = 2) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = VitsTokenizer(str(path / "vocab.json"), pad_token="<pad>", unk_token="<unk>", add_blank=True,
                              normalize=True, phonemize=False, is_uroman=False)
    config = VitsConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        ffn_dim=32, flow_size=16, spectrogram_bins=8, upsample_initial_channel=16,
                        upsample_rates=[8, 8], upsample_kernel_sizes=[16, 16], resblock_kernel_sizes=[3],
                        resblock_dilation_sizes=[[1, 3]], duration_predictor_filter_channels=16,
                        duration_predictor_num_flows=2, prior_encoder_num_flows=2, prior_encoder_num_wavenet_layers=2,
                        posterior_encoder_num_wavenet_layers=2, num_speakers=speakers,
                        speaker_embedding_size=8 if speakers > 1 else 0, sampling_rate=16000)
    torch.manual_seed(0)  # weights only; the backend under test never touches the global RNG
    VitsModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
