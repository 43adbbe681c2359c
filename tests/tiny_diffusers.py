"""Tiny random-weight diffusers pipelines built in code and saved with ``save_pretrained``.

The real diffusers and transformers classes at toy size (no downloads, no weights from
anywhere): a CLIP BPE tokenizer written here (one token per character, so prompt lengths
are easy to reason about), CLIP text encoders, a UNet, a VAE and a scheduler. The saved
directories load exactly like a real model directory, through ``DiffusersKeyframes``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for bytes (GPT-2's table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(path: Path) -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every character is one token (words end in ``</w>``)."""
    path.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + [BOS, EOS])}
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77,
                         bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)


def _text_config(tok: CLIPTokenizer, hidden: int = 32, projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          projection_dim=projection or hidden)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32)


def save_sd15(path: Path, *, controlnet: Path | None = None) -> Path:
    """A Stable Diffusion 1.5-style pipeline (one CLIP text encoder, cross-attention UNet)."""
    torch.manual_seed(0)  # weights only; the backend under test never touches the global RNG
    tok = write_tokenizer(path.with_name(path.name + "-tokenizer"))
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(tok)), tokenizer=tok, unet=unet,
                                   scheduler=EulerDiscreteScheduler(timestep_spacing="trailing"), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    if controlnet is not None:
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
        with torch.no_grad():  # a fresh ControlNet's zero convolutions add nothing; make them count
            for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
                conv.weight.normal_(0.0, 0.5)
        net.save_pretrained(controlnet)
    return path


def save_sdxl(path: Path) -> Path:
    """An SDXL-style pipeline: two CLIP text encoders (the second with projection), added time embeds."""
    torch.manual_seed(0)
    tok = write_tokenizer(path.with_name(path.name + "-tokenizer"))
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                                projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=32)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(tok)), tokenizer=tok,
                                     text_encoder_2=CLIPTextModelWithProjection(_text_config(tok)), tokenizer_2=tok,
                                     unet=unet, scheduler=EulerDiscreteScheduler(timestep_spacing="trailing"),
                                     force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(path)
    return path
