"""Diffusers keyframes backend: keyframes, background plates and character sheets drawn by any
diffusers text-to-image model from a local directory or the local Hugging Face cache.

Load once in ``__init__`` (after validating everything that can be checked without loading),
work on batches in ``__call__``. Composition follows the shot: in ``img2img`` mode the init
image of a keyframe is the previz cel at the keyframe time (camera framing, where characters
stand) — or, when ``layered``, the generated plate of the location through the shot's camera
with the characters composited on it, so a scene pays for one background. Every image has
its own seed from a stable hash (the request's seed — from the shot's content — and the frame
index; the location; the character name) and its own ``torch.Generator``, so a re-render is bit-identical on the same hardware
however the requests are batched. Not Ray-aware; no global state; the global torch RNG is
never used.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw

from stages.keyframes import DiffusionSettings
from stages.records import Frame, KeyframeRequest, Keyframes, ProfileError, ShotScene
from stages import prompts
from stages.backgrounds import background_plate, setting_of
from stages.draw import draw_figure, draw_title_card, render_cel
from stages.staging import Placement, frame_camera, layout, stable_hash

VERSION = "1"
EXPECTED = ("a diffusers pipeline directory with model_index.json (e.g. saved with save_pretrained), "
            "or a model id already in the local Hugging Face cache")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
PlateKey = tuple[str, str, str]  # (location, time of day, 'INT'/'EXT')


# --------------------------------------------------------------------------- validation


def resolve_local(ref: str, *, marker: str, what: str) -> Path:
    """A local directory holding ``marker``, or the snapshot of a cached Hub repo; never downloads."""
    path = Path(ref).expanduser()
    if path.is_dir() and (path / marker).is_file():
        return path
    if not path.exists() and not ref.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
        try:
            snap = Path(snapshot_download(ref, local_files_only=True))
            if (snap / marker).is_file():
                return snap
        except (LocalEntryNotFoundError, HFValidationError):
            pass
    found = "a directory without " + marker if path.is_dir() else "a file" if path.exists() else "nothing"
    raise ProfileError(f"{what}: {ref!r} is {found} there; expected {EXPECTED.replace('model_index.json', marker)}")


def weight_bytes(root: Path, dtype: torch.dtype) -> int:
    """Bytes the weights under ``root`` take in ``dtype``: parameter counts from safetensors
    headers (floats converted to ``dtype``), other weight files by size on disk."""
    total, size = 0, torch.finfo(dtype).bits // 8
    for f in root.rglob("*"):
        if f.suffix == ".safetensors":
            with f.open("rb") as fh:
                header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
            for name, t in header.items():
                if name != "__metadata__":
                    n = math.prod(t["shape"])
                    total += n * (size if t["dtype"].startswith(("F", "BF")) else DTYPE_BYTES.get(t["dtype"], 4))
        elif f.suffix in (".bin", ".pt", ".ckpt", ".pth"):
            total += f.stat().st_size
    return total


def check_device(settings: DiffusionSettings) -> torch.device:
    """The torch device of the settings, or a ProfileError saying why it cannot be used."""
    device = torch.device(settings.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ProfileError(f"diffusers.device: {settings.device!r} requested but this torch "
                               f"({torch.__version__}) sees no CUDA device; use device = 'cpu'")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ProfileError(f"diffusers.device: {settings.device!r} but only {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ProfileError(f"diffusers.device: {settings.device!r} requested but MPS is not available")
    elif device.type == "cpu":
        if settings.dtype == "float16":
            raise ProfileError("diffusers.dtype: float16 on device 'cpu' is slow or unsupported in many kernels; "
                               "use dtype = 'float32' or 'bfloat16'")
        if settings.offload != "none":
            raise ProfileError(f"diffusers.offload: {settings.offload!r} offloads to the CPU from an accelerator; "
                               "with device = 'cpu' use offload = 'none'")
    return device


def check_fits(model_dir: Path, settings: DiffusionSettings, device: torch.device) -> None:
    """Without offload, the weights must fit in the free memory of the CUDA device."""
    if device.type != "cuda" or settings.offload != "none":
        return
    need = weight_bytes(model_dir, DTYPES[settings.dtype])
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        raise ProfileError(f"diffusers.model: {model_dir} does not fit: its weights need {need / 2**30:.1f} GiB in "
                           f"{settings.dtype}, {device} has {free / 2**30:.1f} GiB free; set offload = 'model' "
                           "or 'sequential', a smaller dtype, or a smaller model")


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Request:
    """One image to generate: prompts, seed, and (img2img) the init image at generation size."""

    prompt: str
    negative: str
    seed: int
    init: np.ndarray | None = None
    reference: np.ndarray | None = None  # IP-Adapter image (a character sheet)


def seed_of(*parts: object) -> int:
    """A 63-bit seed from a stable hash; the same in every process and on every machine."""
    return stable_hash("seed", *parts) & (2**63 - 1)


def plate_key(shot: ShotScene) -> PlateKey:
    """Which background plate a shot uses: one per (location, time of day, INT/EXT)."""
    return (shot.location, shot.time_of_day, setting_of(shot.heading, shot.location))


def _figure_boxes(shot: ShotScene, t: float, width: int, height: int) -> list[tuple[Placement, tuple[float, ...]]]:
    """Each on-screen character's placement and screen box (x0, y0, x1, y1), as render_cel frames it."""
    placements = layout(shot.shot, t=t, width=width, height=height)
    view = frame_camera(shot.shot, placements, width=width, height=height)
    out = []
    for p in placements:
        u = p.unit
        x0, y0 = view.to_screen(p.x - 1.4 * u, p.ground - p.lift - 6.0 * u, width, height)
        x1, y1 = view.to_screen(p.x + 1.4 * u, p.ground + 0.2 * u, width, height)
        out.append((p, (x0, y0, x1, y1)))
    return out


def character_crops(shot: ShotScene, t: float, image: np.ndarray) -> dict[str, np.ndarray]:
    """The part of a keyframe where each character stands (for ``consistency_score``)."""
    h, w = image.shape[:2]
    out = {}
    for p, (x0, y0, x1, y1) in _figure_boxes(shot, t, w, h):
        ix0, iy0, ix1, iy1 = max(0, int(x0)), max(0, int(y0)), min(w, int(math.ceil(x1))), min(h, int(math.ceil(y1)))
        if ix1 - ix0 >= 2 and iy1 - iy0 >= 2:
            out[p.name] = image[iy0:iy1, ix0:ix1]
    return out


def _cutout(sheet: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The figure of a character sheet and its mask: pixels unlike the sheet's border colour."""
    border = np.concatenate([sheet[0], sheet[-1], sheet[:, 0], sheet[:, -1]]).astype(np.int16)
    bg = np.median(border, axis=0)
    mask = (np.abs(sheet.astype(np.int16) - bg).sum(axis=2) > 60).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return sheet, np.ones(sheet.shape[:2], np.uint8)
    return sheet[ys.min():ys.max() + 1, xs.min():xs.max() + 1], mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


# --------------------------------------------------------------------------- backend


class DiffusersKeyframes:
    """Keyframes, plates and character sheets from one diffusers pipeline, loaded once."""

    name = "diffusers"

    def __init__(self, *, width: int, height: int, settings: DiffusionSettings):
        # 1. validate everything that can be checked before loading weights (see ready())
        if width < 16 or height < 16:
            raise ValueError(f"DiffusersKeyframes: size {width}x{height} is too small (at least 16x16)")
        s = settings
        if s.layered and s.mode != "img2img":
            raise ProfileError("diffusers.layered: composited plates are img2img init images; with "
                               "mode = 'txt2img' set layered = false")
        if s.mode == "img2img" and int(s.steps * s.strength) < 1:
            raise ProfileError(f"diffusers.steps × strength = {s.steps} × {s.strength} < 1: img2img would run no "
                               "denoising step; raise steps or strength")
        model_dir = resolve_local(s.model, marker="model_index.json", what="diffusers.model")
        control_dir = resolve_local(s.controlnet, marker="config.json", what="diffusers.controlnet") if s.controlnet else None
        if s.ip_adapter and not Path(s.ip_adapter).is_file():
            raise ProfileError(f"diffusers.ip_adapter: {s.ip_adapter!r} is not a file; expected IP-Adapter weights "
                               "(.safetensors/.bin) with its image encoder in an 'image_encoder' folder beside it")
        self.device = check_device(s)
        check_fits(model_dir, s, self.device)
        self.width, self.height, self.settings, self.model_dir = width, height, s, model_dir

        # 2. load once: one pipeline class for the mode, ControlNet and IP-Adapter if given
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, ControlNetModel
        dtype = DTYPES[s.dtype]
        extra = {}
        if control_dir is not None:
            extra["controlnet"] = ControlNetModel.from_pretrained(control_dir, dtype=dtype, local_files_only=True)
        cls = AutoPipelineForImage2Image if s.mode == "img2img" else AutoPipelineForText2Image
        self.pipe = cls.from_pretrained(model_dir, dtype=dtype, local_files_only=True, **extra)
        if s.ip_adapter:
            weights = Path(s.ip_adapter)
            self.pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name,
                                      local_files_only=True)
        if s.offload == "model":
            self.pipe.enable_model_cpu_offload(device=self.device)
        elif s.offload == "sequential":
            self.pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

        # 3. generation size: the profile size, or scaled to gen_short_side, in latent-friendly multiples
        multiple = int(getattr(self.pipe, "vae_scale_factor", 8)) * 2
        k = s.gen_short_side / min(width, height) if s.gen_short_side else 1.0
        self.gen_size = tuple(max(multiple, int(round(v * k / multiple)) * multiple) for v in (width, height))
        tok = getattr(self.pipe, "tokenizer", None)
        limit = getattr(self.pipe, "tokenizer_max_length", None) or getattr(tok, "model_max_length", None)
        # CLIP: 77 with start/end tokens; long-text encoders (Qwen-Image: 1024) get long prompts
        self.max_tokens = None if limit is None or limit > 100_000 else limit - 2
        self.count_tokens = (lambda text: len(tok(text, add_special_tokens=False).input_ids)) if tok else None
        self.stats = {"images": 0, "batches": 0, "plates": 0, "sheets": 0}

    def ready(self) -> str:
        """Loaded: what this instance runs on (the pipeline waits on it before spending anything)."""
        return f"{type(self.pipe).__name__} from {self.model_dir} on {self.device}"

    # ---------------------------------------------------------------- building blocks

    def generate(self, requests: list[Request], size: tuple[int, int]) -> list[np.ndarray]:
        """Images (h, w, 3) uint8 at ``size`` = (w, h), in batches of ``settings.batch_size``."""
        out = []
        for i in range(0, len(requests), self.settings.batch_size):
            out += self._batch(requests[i:i + self.settings.batch_size], size)
        return out

    def _batch(self, batch: list[Request], size: tuple[int, int]) -> list[np.ndarray]:
        s, (w, h) = self.settings, size
        kw: dict = dict(prompt=[r.prompt for r in batch], negative_prompt=[r.negative for r in batch],
                        num_inference_steps=s.steps, guidance_scale=s.guidance_scale, output_type="np",
                        generator=[torch.Generator(self.device).manual_seed(r.seed) for r in batch])
        inits = [np.ascontiguousarray(r.init, dtype=np.float32) / 255.0 for r in batch if r.init is not None]
        if s.mode == "img2img":
            kw.update(image=inits, strength=s.strength)
        else:
            kw.update(width=w, height=h)
        if s.controlnet:  # line art of the composition: the previz edges
            edges = [np.repeat(cv2.Canny((i * 255).astype(np.uint8), 60, 140)[..., None], 3, 2).astype(np.float32) / 255
                     for i in inits] or [np.zeros((h, w, 3), np.float32)] * len(batch)
            kw["control_image" if s.mode == "img2img" else "image"] = edges
        if s.ip_adapter:
            kw["ip_adapter_image_embeds"] = self._reference_embeds(batch, size)
        with torch.inference_mode():
            images = self.pipe(**kw).images
        self.stats["images"] += len(batch)
        self.stats["batches"] += 1
        images = (np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
        return [img if img.shape[:2] == (h, w) else cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
                for img in images]

    def _reference_embeds(self, batch: list[Request], size: tuple[int, int]) -> list[torch.Tensor]:
        """IP-Adapter embeddings, one reference image per request (white where there is none)."""
        cfg = self.settings.guidance_scale > 1
        white = np.full((size[1], size[0], 3), 255, np.uint8)
        embeds = [self.pipe.prepare_ip_adapter_image_embeds(
            Image.fromarray(r.reference if r.reference is not None else white), None, self.device, 1, cfg)[0]
            for r in batch]
        if cfg:  # each is cat([negative, positive]); the pipeline wants all negatives, then all positives
            negs, poss = zip(*(e.chunk(2) for e in embeds))
            return [torch.cat([*negs, *poss])]
        return [torch.cat(embeds)]

    def _prompt(self, fn, *args) -> str:
        return fn(*args, self.settings, max_tokens=self.max_tokens, count_tokens=self.count_tokens)

    # ---------------------------------------------------------------- plates and sheets

    def background_plate(self, location: str, time_of_day: str, setting: str) -> np.ndarray:
        """One generated background of a location at a time of day, nobody in it, at ``gen_size``.
        img2img starts from the previz plate so the horizon and floor stay where figures stand."""
        w, h = self.gen_size
        init = background_plate(location, time_of_day, setting, w, h) if self.settings.mode == "img2img" else None
        req = Request(self._prompt(prompts.plate_prompt, location, time_of_day, setting),
                      prompts.negative_prompt(self.settings, plate=True),
                      seed_of("plate", location.strip().upper(), time_of_day.upper(), setting), init)
        self.stats["plates"] += 1
        return self.generate([req], (w, h))[0]

    def character_sheet(self, name: str) -> np.ndarray:
        """A neutral full-body image of a character on white, square at the generation short side;
        the seed depends on the name only, so a series draws each character once."""
        side = min(self.gen_size)
        init = None
        if self.settings.mode == "img2img":  # the previz figure standing in the middle, facing right
            canvas = Image.new("RGB", (side * 2, side * 2), (255, 255, 255))
            fig = Placement(name, x=side, ground=side * 1.92, height=side * 1.75, facing=1)
            draw_figure(ImageDraw.Draw(canvas, "RGBA"), fig, lambda x, y: (x, y))
            init = cv2.resize(np.asarray(canvas), (side, side), interpolation=cv2.INTER_AREA)
        req = Request(self._prompt(prompts.sheet_prompt, name), self.settings.negative_prompt,
                      seed_of("sheet", name.strip().upper()), init)
        self.stats["sheets"] += 1
        return self.generate([req], (side, side))[0]

    def compose(self, plate: np.ndarray, shot: ShotScene, t: float,
                sheets: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """A layered init image at ``gen_size``: the generated plate through the shot's camera
        (as previz frames its own plate), with the previz figures drawn on it — or, given
        ``sheets``, each character's sheet cut out and pasted where the layout puts them."""
        w, h = self.gen_size
        if plate.shape[:2] != (h, w):
            raise ValueError(f"compose: plate is {plate.shape[1]}x{plate.shape[0]}, expected gen_size {w}x{h}")
        if not sheets:
            loc, tod, setting = plate_key(shot)
            return render_cel(shot, t, w, h, {(loc, tod, setting, w, h): plate})
        # the plate through the damped plate camera, as render_cel step 2 does
        cam = frame_camera(shot.shot, layout(shot.shot, t=t, width=w, height=h), width=w, height=h)
        m = np.float32([[cam.pscale, 0, w / 2 - cam.pscale * cam.pcx], [0, cam.pscale, h / 2 - cam.pscale * cam.pcy]])
        frame = cv2.warpAffine(plate, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        if cam.blur >= 0.5:
            frame = cv2.GaussianBlur(frame, (0, 0), cam.blur)
        for p, (x0, y0, x1, y1) in sorted(_figure_boxes(shot, t, w, h), key=lambda b: (b[0].speaking, b[0].name)):
            if p.name not in sheets:
                raise ValueError(f"compose: no character sheet for {p.name!r} (shot {shot.shot.id})")
            fig, mask = _cutout(sheets[p.name])
            fh = max(2, int(round(y1 - y0)))
            fw = max(2, int(round(fig.shape[1] * fh / fig.shape[0])))
            fig, mask = cv2.resize(fig, (fw, fh)), cv2.resize(mask, (fw, fh), interpolation=cv2.INTER_NEAREST)
            if p.facing < 0:
                fig, mask = fig[:, ::-1], mask[:, ::-1]
            fx, fy = int(round((x0 + x1) / 2 - fw / 2)), int(round(y0))
            sx0, sy0, sx1, sy1 = max(0, fx), max(0, fy), min(w, fx + fw), min(h, fy + fh)
            if sx1 > sx0 and sy1 > sy0:
                m = mask[sy0 - fy:sy1 - fy, sx0 - fx:sx1 - fx, None].astype(bool)
                frame[sy0:sy1, sx0:sx1] = np.where(m, fig[sy0 - fy:sy1 - fy, sx0 - fx:sx1 - fx], frame[sy0:sy1, sx0:sx1])
        return frame

    # ---------------------------------------------------------------- keyframes

    def __call__(self, shots: list[KeyframeRequest], *, plates: Mapping[PlateKey, np.ndarray] | None = None,
                 sheets: Mapping[str, np.ndarray] | None = None) -> list[Keyframes]:
        """The keyframes of every request (one shot each), generated in batches across shots.

        ``plates`` (by ``plate_key``) and ``sheets`` (by character name) may come from the
        pipeline's cache; when layered, missing plates are generated here, once per key per
        call. Sheets are used for composition when given, and as IP-Adapter references when
        the profile has one (generated here if not given).
        """
        # 1. plates and sheets this batch needs
        s, (w, h) = self.settings, self.gen_size
        plates = dict(plates or {})
        if s.layered:
            for key in dict.fromkeys(plate_key(p.scene) for p in shots):
                if key not in plates:
                    plates[key] = self.background_plate(*key)
        sheets = dict(sheets or {})
        if s.ip_adapter:
            for name in dict.fromkeys(n for p in shots for n in p.shot.characters):
                if name not in sheets:
                    sheets[name] = self.character_sheet(name)
        # 2. one request per keyframe of every shot
        requests, owners = [], []
        for req in shots:
            scene = req.scene
            text = self._prompt(prompts.shot_prompt, scene)
            focus = req.shot.characters[0] if req.shot.characters else None
            for k, t in zip(req.indices, req.times):
                init = None
                if s.mode == "img2img":
                    init = (self.compose(plates[plate_key(scene)], scene, t, sheets if not s.ip_adapter else None)
                            if s.layered else render_cel(scene, t, w, h, {}))
                requests.append(Request(text, prompts.negative_prompt(s), seed_of("keyframe", req.seed, k),
                                        init, sheets.get(focus) if s.ip_adapter and focus else None))
                owners.append((req.shot.id, k))
        # 3. generate across shots, back to the profile size, regroup by shot
        images = self.generate(requests, (w, h))
        by_shot: dict[str, list[Frame]] = {p.shot.id: [] for p in shots}
        titles = {p.shot.id: p.shot.title for p in shots}
        for (shot_id, k), img in zip(owners, images):
            if (w, h) != (self.width, self.height):
                img = cv2.resize(img, (self.width, self.height), interpolation=cv2.INTER_LANCZOS4)
            if titles[shot_id]:  # a title card's letters are set, not generated: models garble text
                img = draw_title_card(img, titles[shot_id])
            by_shot[shot_id].append(Frame(index=k, image=img))
        return [Keyframes(shot=p.shot.id, frames=by_shot[p.shot.id]) for p in shots]
