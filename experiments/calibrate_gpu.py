"""GPU throughput of the diffusers keyframe backend, measured on real architectures at real size
with random weights (compute time does not depend on weight values; nothing is downloaded).

For each model family — SD 1.5 (UNet 320/640/1280/1280, cross-attention 768 + VAE), SDXL
(UNet 320/640/1280, cross-attention 2048, text-time embeddings + VAE) and Qwen-Image (the
20B MMDiT transformer + its VAE, the largest that fits one H200) — at the profile resolutions
(16:9 and 9:16) and batch sizes, it times

* one denoising step: ``REPS`` forward passes of the denoiser after a warm-up, plus the
  scheduler's latent update (text conditioning is random embeddings of the right shape:
  the text encoder runs once per prompt and is negligible next to the steps), and
* the VAE decode of the batch,

and writes, per steps in ``STEPS``, ``seconds_per_image = (steps × t_step + t_decode) / batch``
(img2img with strength s runs ⌊steps × s⌋ steps: scale accordingly; classifier-free guidance
doubles the denoiser batch: read the row with twice the batch). Beside the eager step time
(what the backend pays), each configuration is also captured once as a CUDA graph and replayed:
the GPU's own time for the step, without Python and launch overhead. Eager far above the graph
figure means the step is host-bound at that batch, and batching is the lever.

Rows go to ``cluster/calibration_gpu.csv`` (the calibration columns plus model, steps, batch,
width, height, seconds_per_image, step_ms_eager, step_ms_graph, decode_ms); the source says "measured on <GPU>, random
weights". The whole run is time-boxed (``--budget-s``, default 450 s) and prints progress;
configurations left when the budget is spent are skipped and reported. The CSV is rewritten after
every configuration, so a run stopped from outside keeps what it measured.

    .venv/bin/python experiments/calibrate_gpu.py            # on a CUDA machine, fp16/bf16
    .venv/bin/python experiments/calibrate_gpu.py --smoke    # CPU, tiny configs, 1 step: proves the code path
"""
from __future__ import annotations

import argparse
import csv
import gc
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FIELDS = ["stage", "backend", "device", "unit", "overhead_s", "seconds_per_unit_mpx", "source", "measured_at",
          "model", "steps", "batch", "width", "height", "seconds_per_image", "step_ms_eager",
          "step_ms_graph", "decode_ms"]
STEPS = (4, 8, 20, 30)
REPS = 10

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
              layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
QWEN_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
QWEN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True])


@dataclass
class Family:
    """One model family: how to build it, its text shape, and what to measure."""

    name: str
    denoiser: dict
    vae: dict
    text_len: int
    text_dim: int
    sizes: list[tuple[int, int]]
    batches: list[int]
    dtype: torch.dtype = torch.float16
    kind: str = "unet"  # "unet" (SD/SDXL) or "qwen"
    skipped: list[str] = field(default_factory=list)


def families(smoke: bool) -> list[Family]:
    if smoke:  # tiny configs of the same classes
        tiny_vae = dict(SD_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1)
        tiny_unet = dict(SD15_UNET, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, layers_per_block=1)
        tiny_xl = dict(SDXL_UNET, block_out_channels=(32, 64, 64), cross_attention_dim=64, attention_head_dim=(2, 4, 4),
                       transformer_layers_per_block=(1, 1, 1), layers_per_block=1, addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=8 * 6 + 1280)
        tiny_qwen = dict(QWEN_TRANSFORMER, num_layers=1, attention_head_dim=16, num_attention_heads=2,
                         joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
        tiny_qvae = dict(QWEN_VAE, base_dim=8, num_res_blocks=1)
        f32 = torch.float32
        return [Family("sd15", tiny_unet, tiny_vae, 77, 32, [(64, 48)], [1, 2], f32),
                Family("sdxl", tiny_xl, tiny_vae, 77, 64, [(64, 48)], [1], f32),
                Family("qwen-image", tiny_qwen, tiny_qvae, 16, 32, [(64, 48)], [1], f32, "qwen")]
    return [Family("sd15", SD15_UNET, SD_VAE, 77, 768, [(512, 288), (768, 432), (288, 512), (432, 768)], [1, 4, 8]),
            Family("sdxl", SDXL_UNET, SD_VAE, 77, 2048, [(1024, 576), (576, 1024), (768, 432)], [1, 4, 8]),
            Family("qwen-image", QWEN_TRANSFORMER, QWEN_VAE, 256, 3584, [(1024, 576), (576, 1024)], [1, 4],
                   torch.bfloat16, "qwen")]


def build(fam: Family, device: torch.device):
    """Denoiser and VAE from their configs, random weights, created directly on the device in the dtype."""
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage, QwenImageTransformer2DModel, UNet2DConditionModel
    previous = torch.get_default_dtype()
    torch.set_default_dtype(fam.dtype)  # never materialise a 20B model in float32
    try:
        with device:
            if fam.kind == "qwen":
                return QwenImageTransformer2DModel(**fam.denoiser).eval(), AutoencoderKLQwenImage(**fam.vae).eval()
            return UNet2DConditionModel(**fam.denoiser).eval(), AutoencoderKL(**fam.vae).eval()
    finally:
        torch.set_default_dtype(previous)


def inputs(fam: Family, batch: int, width: int, height: int, device: torch.device) -> tuple[dict, torch.Tensor]:
    """Denoiser keyword arguments and the latents the VAE decodes, random, of the real shapes."""
    g = torch.Generator(device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=fam.dtype)  # noqa: E731
    lh, lw = height // 8, width // 8
    text = rnd(batch, fam.text_len, fam.text_dim)
    if fam.kind == "qwen":
        kw = dict(hidden_states=rnd(batch, (lh // 2) * (lw // 2), 64), encoder_hidden_states=text,
                  encoder_hidden_states_mask=torch.ones(batch, fam.text_len, device=device, dtype=torch.long),
                  timestep=torch.full((batch,), 0.5, device=device, dtype=fam.dtype),
                  img_shapes=[[(1, lh // 2, lw // 2)]] * batch, return_dict=False)
        return kw, rnd(batch, 16, 1, lh, lw)
    kw = dict(sample=rnd(batch, 4, lh, lw), timestep=torch.tensor(500, device=device), encoder_hidden_states=text,
              return_dict=False)
    if fam.denoiser.get("addition_embed_type") == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": rnd(batch, 1280), "time_ids": rnd(batch, 6)}
    return kw, rnd(batch, 4, lh, lw)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fam: Family, denoiser, vae, batch: int, width: int, height: int, device: torch.device,
            reps: int) -> tuple[float, float, float]:
    """(seconds per step in eager PyTorch, seconds per step replaying a CUDA graph of it — NaN when
    the model cannot be captured or on the CPU —, seconds per VAE decode of the batch).

    The eager figure is what the backend pays today; the graph figure is the GPU's own time with
    the Python and kernel-launch overhead removed: where the two are close the step is GPU-bound,
    where eager is far above it the step is host-bound and batching (or compiling) is the lever.
    """
    kw, latents = inputs(fam, batch, width, height, device)
    key = "hidden_states" if fam.kind == "qwen" else "sample"
    with torch.inference_mode():
        # 1. eager: warm-up (kernels, allocator), then reps steps with the scheduler's update
        denoiser(**kw)
        sync(device)
        start = time.perf_counter()
        x = kw[key]
        for _ in range(reps):
            out = denoiser(**{**kw, key: x})[0]
            x = x - 0.01 * out  # the scheduler's update
        sync(device)
        eager = (time.perf_counter() - start) / reps
        # 2. the same step captured once in a CUDA graph and replayed
        graph = _graph_step(denoiser, kw, device, reps)
        # 3. VAE decode of the batch, after a warm-up decode (the first one pays cuDNN's set-up)
        vae.decode(latents, return_dict=False)
        sync(device)
        t0 = time.perf_counter()
        vae.decode(latents, return_dict=False)
        sync(device)
        decode = time.perf_counter() - t0
    return eager, graph, decode


def _graph_step(denoiser, kw: dict, device: torch.device, reps: int) -> float:
    """Seconds per replay of one captured denoiser call; NaN if it cannot be captured."""
    if device.type != "cuda":
        return float("nan")
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                denoiser(**kw)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            denoiser(**kw)
        g.replay()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            g.replay()
        sync(device)
        return (time.perf_counter() - t0) / reps
    except Exception as exc:  # noqa: BLE001 - a model that cannot be captured is a finding, not a failure
        print(f"  (no CUDA graph: {type(exc).__name__}: {str(exc)[:120]})", flush=True)
        sync(device)
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny configs, 1 step; rows go to a temp file")
    ap.add_argument("--out", type=Path, help="CSV to write (default cluster/calibration_gpu.csv; temp file with --smoke)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting new measurements after this")
    ap.add_argument("--only", nargs="*", help="model families to run (sd15, sdxl, qwen-image)")
    ap.add_argument("--reps", type=int, default=REPS, help="timed steps per configuration (after a warm-up)")
    args = ap.parse_args(argv)

    # 1. device
    if args.smoke:
        device, gpu, steps = torch.device("cpu"), "cpu (smoke)", (1,)
    elif torch.cuda.is_available():
        device, gpu, steps = torch.device("cuda"), torch.cuda.get_device_name(0), STEPS
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        print("calibrate_gpu: no CUDA device; nothing measured (use --smoke to check the code path on CPU)")
        return 2
    out = args.out or (Path(tempfile.mkdtemp()) / "calibration_gpu.csv" if args.smoke else REPO / "cluster" / "calibration_gpu.csv")
    resource = "cpu" if args.smoke else "gpu:" + gpu.replace("NVIDIA", "").strip().split()[0]
    source = f"measured on {gpu}, random weights, experiments/calibrate_gpu.py"
    deadline = time.perf_counter() + args.budget_s
    rows: list[dict] = []

    # 2. families, each config time-boxed by the overall deadline
    for fam in families(args.smoke):
        if args.only and fam.name not in args.only:
            continue
        if time.perf_counter() > deadline:
            print(f"[{fam.name}] skipped: budget spent", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            denoiser, vae = build(fam, device)
        except torch.OutOfMemoryError as exc:
            print(f"[{fam.name}] does not fit on {gpu}: {exc}", flush=True)
            continue
        params = sum(p.numel() for p in denoiser.parameters()) / 1e9
        print(f"[{fam.name}] built {params:.2f}B-parameter denoiser in {time.perf_counter() - t0:.1f}s", flush=True)
        for width, height in fam.sizes:
            for batch in fam.batches:
                if time.perf_counter() > deadline:
                    fam.skipped.append(f"{width}x{height} b{batch}")
                    continue
                try:
                    t_step, t_graph, t_dec = measure(fam, denoiser, vae, batch, width, height, device, args.reps)
                except torch.OutOfMemoryError:
                    fam.skipped.append(f"{width}x{height} b{batch} (out of memory)")
                    torch.cuda.empty_cache()
                    continue
                print(f"[{fam.name}] {width}x{height} batch {batch}: {t_step * 1000:.1f} ms/step, "
                      f"as a CUDA graph {t_graph * 1000:.1f} ms/step, decode {t_dec * 1000:.1f} ms", flush=True)
                for n in steps:
                    per_image = (n * t_step + t_dec) / batch
                    rows.append(dict(stage="keyframes", backend=f"diffusers:{fam.name}:s{n}:b{batch}", device=resource,
                                     unit="keyframe", overhead_s=0.0,
                                     seconds_per_unit_mpx=round(per_image / (width * height / 1e6), 6),
                                     source=source, measured_at=date.today().isoformat(), model=fam.name, steps=n,
                                     batch=batch, width=width, height=height,
                                     seconds_per_image=round(per_image, 6), step_ms_eager=round(1000 * t_step, 2),
                                     step_ms_graph=round(1000 * t_graph, 2), decode_ms=round(1000 * t_dec, 2)))
                write(out, rows)
        if fam.skipped:
            print(f"[{fam.name}] skipped (budget or memory): {', '.join(fam.skipped)}", flush=True)
        del denoiser, vae
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"wrote {len(rows)} rows to {out}")
    return 0 if rows else 1


def write(out: Path, rows: list[dict]) -> None:
    """Write every row so far (atomically): a run stopped from outside keeps what it measured."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out)


if __name__ == "__main__":
    sys.exit(main())
