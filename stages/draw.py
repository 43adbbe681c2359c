"""Previz drawing engine: background plates, cel-style figures, camera framing, CJK text.

Not a stage: ``stages.storyboard`` and ``stages.keyframes`` both draw with it. Everything
here is deterministic — every "random" choice is derived from a sha256 of names, never from
a global RNG or Python's salted ``hash()`` — so the same shot gives the same bytes in every
process. Nothing is cached at module level; callers own the plate cache they pass in.

The scene is composed in *world* coordinates (pixels of the full frame at the target size,
ground line near the bottom) and shown through a virtual camera (scale + centre), so one
layout serves every framing from establishing shot to extreme close-up. The plate moves
with a damped camera (multiplane parallax), figures with the full one.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import MutableMapping

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.models import Camera, Shot, ShotPlan

RGB = tuple[int, int, int]
LINE: RGB = (38, 30, 48)  # line-art colour
SS = 2  # supersampling factor for anti-aliased line art


# --------------------------------------------------------------------------- hashing


def stable_hash(*parts: object) -> int:
    """A 64-bit integer from sha256 of the parts; identical in every process."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def _rng(*parts: object) -> np.random.Generator:
    """A local generator seeded from names (never the global numpy RNG)."""
    return np.random.Generator(np.random.PCG64(stable_hash(*parts)))


def _shade(c: RGB, k: float = 0.72) -> RGB:
    """The one cel shadow tone of a colour: darker, pushed slightly towards blue."""
    return (int(c[0] * k * 0.92), int(c[1] * k * 0.95), int(min(255, c[2] * k + 14)))


# --------------------------------------------------------------------------- text


def font_path() -> Path:
    """Where the Noto Sans CJK variable TTC lives (package ``manimgx_fonts_cjk``)."""
    try:
        import manimgx_fonts_cjk
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise RuntimeError(
            "previz needs the package 'manimgx-fonts-cjk' (Noto Sans CJK); install the project's dependencies"
        ) from exc
    return Path(manimgx_fonts_cjk.__file__).parent / "NotoSansCJK-VF.otf.ttc"


def load_font(size: int, *, bold: bool = False) -> ImageFont.FreeTypeFont:
    """Noto Sans CJK SC (face 2 of the TTC; covers CJK and Latin) at Regular or Bold weight."""
    path = font_path()
    if not path.is_file():
        raise FileNotFoundError(f"previz font not found: expected Noto Sans CJK at {path}")
    font = ImageFont.truetype(str(path), max(1, int(size)), index=2)
    font.set_variation_by_axes([700 if bold else 400])
    return font


_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\u3000-\u303f]")
_NO_LINE_START = set("，。、！？；：）」』》〉】,.!?;:)]}…·")
_TOKEN = re.compile(r"\s+|[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\u3000-\u303f]|[^\s\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\u3000-\u303f]+")


def wrap_text(text: str, font: ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    """Greedy wrap to ``max_width`` pixels: CJK breaks between any two characters, Latin
    between words; closing punctuation never starts a line; over-long words are split."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for tok in _TOKEN.findall(paragraph):
            if tok.isspace():
                tok = " "
                if not line:
                    continue
            cand = line + tok
            if font.getlength(cand.rstrip()) <= max_width or not line.strip() or tok in _NO_LINE_START:
                line = cand
                if font.getlength(line.rstrip()) > max_width and not _CJK.match(tok) and len(tok) > 1:
                    # a single word wider than the line: split it by characters
                    line, rest = "", line
                    for ch in rest:
                        if line and font.getlength(line + ch) > max_width:
                            lines.append(line.rstrip())
                            line = ""
                        line += ch
                continue
            lines.append(line.rstrip())
            line = "" if tok == " " else tok
        lines.append(line.rstrip())
    return lines


def fit_lines(lines: list[str], max_lines: int, font: ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    """At most ``max_lines`` lines; the last one ends in an ellipsis when text was cut."""
    if len(lines) <= max_lines:
        return lines
    kept = lines[:max_lines]
    last = kept[-1]
    while last and font.getlength(last + "…") > max_width:
        last = last[:-1]
    kept[-1] = last + "…"
    return kept


# --------------------------------------------------------------------------- plates

SKIES: dict[str, tuple[RGB, ...]] = {
    "day": ((78, 142, 228), (176, 214, 246)),
    "dusk": ((58, 44, 112), (188, 92, 140), (252, 168, 86)),
    "night": ((7, 10, 32), (30, 42, 88)),
    "dawn": ((104, 118, 196), (246, 184, 190)),
}
EXT_TINT = {"day": (1.0, 1.0, 1.0), "dusk": (1.0, 0.76, 0.7), "night": (0.3, 0.34, 0.58), "dawn": (0.95, 0.86, 0.92)}
INT_TINT = {"day": (1.0, 1.0, 1.0), "dusk": (1.0, 0.86, 0.78), "night": (0.52, 0.52, 0.7), "dawn": (0.97, 0.92, 0.95)}
_TOD_WORDS = (
    ("night", ("NIGHT", "MIDNIGHT", "夜", "晚上", "深夜")),
    ("dusk", ("DUSK", "SUNSET", "EVENING", "TWILIGHT", "黄昏", "傍晚", "日落")),
    ("dawn", ("DAWN", "SUNRISE", "DAYBREAK", "黎明", "清晨", "拂晓", "日出")),
)
_INTERIOR_WORDS = ("ROOM", "OFFICE", "HOUSE", "KITCHEN", "CLASSROOM", "APARTMENT", "HALL", "CAFE", "SHOP",
                   "STORE", "BAR", "LOBBY", "CORRIDOR", "BEDROOM", "室", "房", "厅", "店", "家", "教室")
_NATURE_WORDS = ("PARK", "FOREST", "GARDEN", "FIELD", "MOUNTAIN", "BEACH", "RIVER", "LAKE", "WOODS", "HILL",
                 "公园", "森林", "花园", "山", "海", "河", "湖", "田")
_CITY_WORDS = ("STREET", "CITY", "ROOF", "ROAD", "TOWN", "ALLEY", "STATION", "街", "城", "天台", "路", "站")


def sky_kind(time_of_day: str) -> str:
    """Map any time-of-day string (DAY, NIGHT, SUNSET, 夜晚, CONTINUOUS, …) to day/dusk/night/dawn."""
    tod = time_of_day.upper()
    for kind, words in _TOD_WORDS:
        if any(w in tod for w in words):
            return kind
    return "day"


def setting_of(scene_heading: str, location: str) -> str:
    """'INT' or 'EXT' from a scene heading's prefix, else from words in the location."""
    head = scene_heading.strip().upper()
    if head.startswith(("INT/EXT", "I/E", "EXT", "外景")):
        return "EXT"
    if head.startswith(("INT", "内景")):
        return "INT"
    return "INT" if any(w in location.upper() for w in _INTERIOR_WORDS) else "EXT"


def _gradient(stops: tuple[RGB, ...], h: int, w: int, y0: float = 0.0, y1: float = 1.0) -> np.ndarray:
    ys = np.clip((np.linspace(0.0, 1.0, h) - y0) / max(y1 - y0, 1e-6), 0.0, 1.0)
    xs = np.linspace(0.0, 1.0, len(stops))
    col = np.stack([np.interp(ys, xs, [s[c] for s in stops]) for c in range(3)], axis=1)
    return np.broadcast_to(col[:, None, :], (h, w, 3)).astype(np.uint8)


def _sky(img: Image.Image, box: tuple[int, int, int, int], kind: str, rng: np.random.Generator) -> None:
    """Paint sky gradient, clouds or stars and moon into ``box`` of ``img``."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if w <= 0 or h <= 0:
        return
    img.paste(Image.fromarray(_gradient(SKIES[kind], h, w)), (x0, y0))
    d = ImageDraw.Draw(img, "RGBA")
    if kind == "night":
        for _ in range(int(w * h / 2500) + 3):
            sx, sy, r = x0 + rng.random() * w, y0 + rng.random() * h * 0.8, 0.5 + rng.random() * 1.6
            d.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(255, 250, 220, 230))
        mr = max(3.0, min(w, h) * 0.09)
        mx, my = x0 + w * (0.62 + 0.22 * rng.random()), y0 + h * 0.4
        d.ellipse((mx - 2.2 * mr, my - 2.2 * mr, mx + 2.2 * mr, my + 2.2 * mr), fill=(200, 210, 255, 28))
        d.ellipse((mx - mr, my - mr, mx + mr, my + mr), fill=(252, 246, 214), outline=LINE, width=max(1, int(mr / 9)))
        d.ellipse((mx - 0.1 * mr, my - 0.5 * mr, mx + 0.3 * mr, my - 0.1 * mr), fill=(226, 220, 190))
        return
    cloud = {"day": (255, 255, 255), "dusk": (252, 196, 170), "dawn": (255, 226, 232)}[kind]
    for _ in range(2 + int(rng.integers(0, 3))):
        cx, cy, s = x0 + rng.random() * w, y0 + h * (0.12 + 0.4 * rng.random()), max(4.0, w * (0.04 + 0.04 * rng.random()))
        d.ellipse((cx - 1.7 * s, cy - 0.1 * s, cx + 1.7 * s, cy + 0.75 * s), fill=_shade(cloud, 0.9))  # cel shadow
        for dx, dy, r in ((-1.1, 0.05, 0.55), (0.0, -0.15, 0.8), (1.0, 0.1, 0.6), (0.45, -0.5, 0.5)):
            d.ellipse((cx + (dx - r) * s, cy + (dy - r) * s, cx + (dx + r) * s, cy + (dy + r) * s), fill=cloud)


def background_plate(location: str, time_of_day: str, setting: str | None, width: int, height: int) -> np.ndarray:
    """The background of a location at a time of day, (height, width, 3) uint8.

    Layout and palette come from a hash of the location only, so a location looks the same
    by day and by night. Exteriors: sky, ground, skyline or trees; interiors: walls, floor,
    a window onto the time of day, furniture. Flat cel colours, one shadow tone, line art.
    """
    if width < 8 or height < 8:
        raise ValueError(f"background_plate: size {width}x{height} is too small (at least 8x8)")
    kind = sky_kind(time_of_day)
    setting = setting if setting in ("INT", "EXT") else ("EXT" if setting == "INT/EXT" else setting_of("", location))
    W, H = width * SS, height * SS
    img = Image.new("RGB", (W, H), (0, 0, 0))
    rng = _rng("plate", location.strip().upper())
    tint = (INT_TINT if setting == "INT" else EXT_TINT)[kind]

    def tc(c: RGB) -> RGB:
        return (int(c[0] * tint[0]), int(c[1] * tint[1]), int(c[2] * tint[2]))

    lw = max(1, round(min(W, H) / 180))
    if setting == "INT":
        _interior(img, kind, rng, tc, lw)
    else:
        _exterior(img, location.upper(), kind, rng, tc, lw)
    return cv2.resize(np.asarray(img), (width, height), interpolation=cv2.INTER_AREA)


def _exterior(img: Image.Image, loc: str, kind: str, rng: np.random.Generator, tc, lw: int) -> None:
    W, H = img.size
    horizon = int(H * 0.64)
    _sky(img, (0, 0, W, horizon), kind, rng)
    d = ImageDraw.Draw(img, "RGBA")
    nature = any(w in loc for w in _NATURE_WORDS) or (not any(w in loc for w in _CITY_WORDS) and rng.random() < 0.35)
    if nature:
        hill = tuple(int(v) for v in rng.choice([(112, 170, 104), (96, 150, 120), (134, 178, 96)]))
        for i in range(3):
            cx, r = W * (0.15 + 0.35 * i + 0.1 * rng.random()), W * (0.22 + 0.1 * rng.random())
            d.ellipse((cx - r, horizon - r * 0.45, cx + r, horizon + r * 0.45), fill=tc(_shade(hill, 0.86)), outline=LINE, width=lw)
        ground = (126, 190, 96)
    else:
        ground = (152, 150, 160)
        # far skyline, then a row of near buildings with windows
        x = -W * 0.02
        while x < W:
            bw, bh = W * (0.05 + 0.06 * rng.random()), H * (0.12 + 0.2 * rng.random())
            d.rectangle((x, horizon - bh, x + bw, horizon), fill=tc((150, 160, 190)))
            x += bw * 0.9
        x = -W * 0.03
        while x < W:
            bw, bh = W * (0.1 + 0.1 * rng.random()), H * (0.22 + 0.22 * rng.random())
            base = tuple(int(v) for v in rng.choice([(226, 200, 170), (196, 206, 220), (232, 222, 206), (190, 160, 150), (210, 214, 200)]))
            d.rectangle((x, horizon - bh, x + bw, horizon), fill=tc(base), outline=LINE, width=lw)
            d.rectangle((x + bw * 0.72, horizon - bh + lw, x + bw - lw, horizon), fill=tc(_shade(base)))
            ww, wh = bw * 0.14, bh * 0.07
            for row in range(int(bh / (wh * 2.2))):
                for col in range(3):
                    wx, wy = x + bw * (0.12 + 0.28 * col), horizon - bh + wh * (1.0 + 2.2 * row)
                    if kind in ("night", "dusk") and rng.random() < (0.55 if kind == "night" else 0.3):
                        d.rectangle((wx, wy, wx + ww, wy + wh), fill=(255, 220, 120), outline=LINE, width=max(1, lw // 2))
                    else:
                        d.rectangle((wx, wy, wx + ww, wy + wh), fill=tc((120, 170, 210)), outline=LINE, width=max(1, lw // 2))
            x += bw
    d.rectangle((0, horizon, W, H), fill=tc(ground))
    d.line((0, horizon, W, horizon), fill=LINE, width=lw)
    d.rectangle((0, int(H * 0.93), W, H), fill=tc(_shade(ground, 0.85)))
    # trees or street lamps in the foreground band
    for i in range(2 + int(rng.integers(0, 3))):
        tx = W * (0.06 + 0.9 * rng.random())
        if nature or rng.random() < 0.5:
            th, tr = H * (0.12 + 0.08 * rng.random()), W * 0.045
            d.rectangle((tx - tr * 0.18, horizon - th * 0.2, tx + tr * 0.18, horizon + th * 0.25), fill=tc((120, 84, 60)), outline=LINE, width=lw)
            leaf = (82, 150, 80)
            for dx, dy, r in ((-0.6, 0.0, 0.8), (0.6, 0.0, 0.8), (0.0, -0.6, 0.95)):
                d.ellipse((tx + (dx - r) * tr, horizon - th * 0.3 + (dy - r) * tr, tx + (dx + r) * tr, horizon - th * 0.3 + (dy + r) * tr),
                          fill=tc(leaf), outline=LINE, width=lw)
            d.ellipse((tx, horizon - th * 0.35, tx + 1.2 * tr, horizon - th * 0.3 + 0.7 * tr), fill=tc(_shade(leaf)))
        else:
            top = horizon - H * 0.2
            d.line((tx, top, tx, horizon + H * 0.06), fill=LINE, width=lw * 2)
            lamp = (255, 236, 160) if kind in ("night", "dusk") else tc((230, 230, 220))
            if kind in ("night", "dusk"):
                g = H * 0.08
                d.ellipse((tx - g, top - g, tx + g, top + g), fill=(255, 230, 150, 50))
            d.ellipse((tx - H * 0.015, top - H * 0.015, tx + H * 0.015, top + H * 0.015), fill=lamp, outline=LINE, width=lw)


def _interior(img: Image.Image, kind: str, rng: np.random.Generator, tc, lw: int) -> None:
    W, H = img.size
    floor = int(H * 0.7)
    d = ImageDraw.Draw(img, "RGBA")
    wall = tuple(int(v) for v in rng.choice([(238, 226, 200), (210, 228, 214), (214, 224, 240), (240, 214, 214), (226, 214, 196)]))
    wood = tuple(int(v) for v in rng.choice([(176, 126, 86), (150, 110, 84), (196, 160, 116)]))
    d.rectangle((0, 0, W, floor), fill=tc(wall))
    d.rectangle((0, floor - H * 0.12, W, floor), fill=tc(_shade(wall, 0.9)))  # wainscot
    d.line((0, floor - H * 0.12, W, floor - H * 0.12), fill=LINE, width=lw)
    d.rectangle((0, floor, W, H), fill=tc(wood))
    for i in range(1, 7):
        y = floor + (H - floor) * (i / 7) ** 1.4
        d.line((0, y, W, y), fill=tc(_shade(wood, 0.85)), width=lw)
    d.line((0, floor, W, floor), fill=LINE, width=lw)
    # window onto the time of day
    win_w, win_h = W * 0.26, H * 0.36
    wx = W * (0.08 + 0.6 * rng.random())
    wy = H * 0.12
    box = (int(wx), int(wy), int(wx + win_w), int(wy + win_h))
    _sky(img, box, kind, _rng("window", int(rng.integers(0, 1 << 30))))
    d = ImageDraw.Draw(img, "RGBA")
    for i in range(5):
        bh = win_h * (0.15 + 0.25 * rng.random())
        bx = box[0] + win_w * i / 5
        d.rectangle((bx, box[3] - bh, bx + win_w / 5 - lw, box[3]), fill=(40, 44, 70) if kind == "night" else tc((150, 160, 190)))
    d.rectangle(box, outline=LINE, width=lw * 2)
    d.line(((box[0] + box[2]) / 2, box[1], (box[0] + box[2]) / 2, box[3]), fill=LINE, width=lw * 2)
    d.line((box[0], (box[1] + box[3]) / 2, box[2], (box[1] + box[3]) / 2), fill=LINE, width=lw * 2)
    curtain = tuple(int(v) for v in rng.choice([(200, 90, 90), (90, 130, 190), (220, 190, 110), (130, 170, 130)]))
    for cx in (box[0] - win_w * 0.12, box[2]):
        d.rectangle((cx, box[1] - H * 0.03, cx + win_w * 0.12, box[3] + H * 0.05), fill=tc(curtain), outline=LINE, width=lw)
        d.rectangle((cx + win_w * 0.08, box[1] - H * 0.03, cx + win_w * 0.12, box[3] + H * 0.05), fill=tc(_shade(curtain)))
    # furniture in free slots away from the window
    slots = [s for s in (0.05, 0.3, 0.55, 0.78) if not (wx - W * 0.2 < W * s < wx + win_w)]
    items = ("shelf", "table", "sofa", "plant", "lamp", "door")
    for s in slots[:3]:
        _furniture(d, items[int(rng.integers(0, len(items)))], W * s, floor, W, H, kind, rng, tc, lw)


def _furniture(d: ImageDraw.ImageDraw, item: str, x: float, floor: float, W: int, H: int, kind: str,
               rng: np.random.Generator, tc, lw: int) -> None:
    wood = (150, 100, 70)
    if item == "shelf":
        w, h = W * 0.14, H * 0.5
        d.rectangle((x, floor - h, x + w, floor), fill=tc(wood), outline=LINE, width=lw)
        for i in range(4):
            y = floor - h + h * (i + 1) / 4.3
            bx = x + w * 0.08
            while bx < x + w * 0.9:
                bw = w * (0.06 + 0.06 * rng.random())
                col = tuple(int(v) for v in rng.choice([(200, 70, 70), (70, 110, 180), (230, 200, 90), (90, 160, 110), (230, 230, 220)]))
                d.rectangle((bx, y - h * (0.12 + 0.06 * rng.random()), bx + bw, y), fill=tc(col), outline=LINE, width=max(1, lw // 2))
                bx += bw + lw
            d.line((x, y, x + w, y), fill=LINE, width=lw)
    elif item == "table":
        w, h = W * 0.16, H * 0.16
        d.rectangle((x, floor - h, x + w, floor - h + H * 0.025), fill=tc(wood), outline=LINE, width=lw)
        for lx in (x + w * 0.06, x + w * 0.88):
            d.rectangle((lx, floor - h + H * 0.025, lx + w * 0.06, floor), fill=tc(_shade(wood)), outline=LINE, width=lw)
        d.rectangle((x + w * 0.3, floor - h - H * 0.05, x + w * 0.42, floor - h), fill=tc((240, 240, 236)), outline=LINE, width=lw)
    elif item == "sofa":
        w, h = W * 0.2, H * 0.17
        col = tuple(int(v) for v in rng.choice([(110, 140, 190), (190, 110, 100), (140, 170, 120)]))
        d.rounded_rectangle((x, floor - h, x + w, floor - h * 0.25), radius=h * 0.2, fill=tc(col), outline=LINE, width=lw)
        d.rectangle((x + w * 0.05, floor - h * 0.55, x + w * 0.95, floor - h * 0.1), fill=tc(_shade(col)), outline=LINE, width=lw)
    elif item == "plant":
        d.polygon([(x, floor - H * 0.1), (x + W * 0.05, floor - H * 0.1), (x + W * 0.04, floor), (x + W * 0.01, floor)],
                  fill=tc((190, 110, 80)), outline=LINE, width=lw)
        for dx, dy in ((-0.02, -0.2), (0.03, -0.24), (0.07, -0.18), (0.025, -0.15)):
            cx, cy, r = x + W * dx + W * 0.005, floor + H * dy, W * 0.035
            d.ellipse((cx - r, cy - r * 1.3, cx + r, cy + r * 1.3), fill=tc((80, 150, 90)), outline=LINE, width=lw)
    elif item == "lamp":
        top = floor - H * 0.42
        d.line((x + W * 0.04, top, x + W * 0.04, floor), fill=LINE, width=lw * 2)
        lit = kind in ("night", "dusk")
        if lit:
            g = H * 0.16
            d.ellipse((x + W * 0.04 - g, top - g * 0.6, x + W * 0.04 + g, top + g * 1.4), fill=(255, 220, 140, 60))
        d.polygon([(x, top + H * 0.06), (x + W * 0.08, top + H * 0.06), (x + W * 0.06, top), (x + W * 0.02, top)],
                  fill=(255, 232, 170) if lit else tc((240, 226, 190)), outline=LINE, width=lw)
    else:  # door
        w, h = W * 0.11, H * 0.55
        d.rectangle((x, floor - h, x + w, floor), fill=tc(wood), outline=LINE, width=lw)
        d.rectangle((x + w * 0.12, floor - h * 0.9, x + w * 0.88, floor - h * 0.55), fill=tc(_shade(wood)), outline=LINE, width=lw)
        d.ellipse((x + w * 0.75, floor - h * 0.5, x + w * 0.85, floor - h * 0.45), fill=tc((230, 200, 90)), outline=LINE, width=lw)


# --------------------------------------------------------------------------- characters

HAIR: tuple[RGB, ...] = ((40, 34, 48), (104, 66, 44), (240, 204, 112), (244, 150, 184), (78, 122, 214),
                         (214, 218, 232), (200, 62, 52), (134, 92, 186), (72, 154, 112), (238, 132, 62))
HAIR_SHAPES = ("short", "spiky", "long", "bob", "ponytail", "twintails")
SKIN: tuple[RGB, ...] = ((255, 228, 210), (250, 214, 186), (236, 190, 152), (204, 154, 114))
EYES: tuple[RGB, ...] = ((70, 110, 200), (120, 70, 40), (60, 150, 110), (170, 60, 80), (130, 80, 190), (200, 140, 40))
TOPS: tuple[RGB, ...] = ((236, 236, 240), (220, 70, 70), (60, 100, 180), (250, 200, 80), (90, 170, 120), (240, 150, 170),
                         (70, 70, 90), (150, 110, 200), (250, 140, 60), (100, 190, 210), (180, 40, 90), (160, 140, 110))
BOTTOMS: tuple[RGB, ...] = ((50, 60, 100), (60, 60, 64), (130, 100, 80), (40, 90, 140), (120, 40, 50), (200, 190, 170))


@dataclass(frozen=True)
class CharacterStyle:
    """How a character is drawn; a pure function of the name."""

    hair: RGB
    hair_shape: str
    skin: RGB
    eyes: RGB
    top: RGB
    bottom: RGB
    skirt: bool
    height: float  # relative to the standard figure, 0.9 … 1.06


def character_style(name: str) -> CharacterStyle:
    """Stable per name: a sha256 of the name picks hair, skin, eyes, outfit and height."""
    h = stable_hash("character", name.strip().upper())
    pick = lambda seq, shift: seq[(h >> shift) % len(seq)]  # noqa: E731
    return CharacterStyle(
        hair=pick(HAIR, 0), hair_shape=pick(HAIR_SHAPES, 8), skin=pick(SKIN, 16), eyes=pick(EYES, 20),
        top=pick(TOPS, 28), bottom=pick(BOTTOMS, 36), skirt=bool((h >> 44) & 1),
        height=0.9 + 0.16 * ((h >> 48) % 1000) / 999,
    )


@dataclass(frozen=True)
class Placement:
    """A character at one moment, in world pixels: feet centre (x, ground), figure height."""

    name: str
    x: float
    ground: float
    height: float
    facing: int  # +1 looks screen-right, -1 screen-left
    lift: float = 0.0  # jump height above ground
    stride: float = 0.0  # leg swing, radians
    arm: float = 0.0  # arm swing, radians
    bob: float = 0.0  # breathing offset, pixels
    mouth: float = 0.0  # 0 closed … 1 wide open
    speaking: bool = False

    @property
    def unit(self) -> float:
        """One head height in world pixels (figures are 5.6 heads tall)."""
        return self.height / 5.6


_MOVES = (  # (kind, pattern) — first match in a clause wins, so specific verbs come first
    ("enter", r"\b(enters?|entering|arrives?|comes? in|walks? in|runs? in)\b|进来|走进|跑进|进入|来到"),
    ("leave", r"\b(leaves?|leaving|exits?|walks? (away|off|out)|runs? (away|off|out)|storms? out|departs?)\b|离开|走出|跑出|出去|离去"),
    ("approach", r"\b(approach(es)?|(walks?|steps?|runs?|moves?) (toward|towards|to|up to)|comes? closer)\b|走向|跑向|靠近|接近|走近"),
    ("move", r"\b(walks?|walking|walked|runs?|running|ran|steps?|strolls?|paces?|crosses|moves?|dash(es)?|sprints?|rush(es)?|chases?|hurr(y|ies))\b|走|跑|奔|冲|追"),
)
_RUN = re.compile(r"\b(run|runs|running|ran|dash|dashes|sprints?|rush|rushes|chases?|hurr(y|ies))\b|跑|奔|冲|追", re.I)
_JUMP = re.compile(r"\b(jumps?|jumping|leaps?|hops?)\b|跳", re.I)
_TURN = re.compile(r"\b(turns?|turning|spins?|whirls?)\b|转身|回头|转过", re.I)
_GROUP = re.compile(r"\b(they|everyone|both|all)\b|他们|她们|大家|两人|众人", re.I)


@dataclass(frozen=True)
class _Move:
    kind: str  # enter | leave | approach | move | none
    run: bool = False
    jump: bool = False
    turn: bool = False
    side: int = 0  # -1 left, +1 right, 0 unspecified


def parse_moves(shot: Shot) -> dict[str, _Move]:
    """Who moves how, from the action text: clause by clause, the subject is the first named
    character in the clause, else everyone for 'they'/他们, else the previous subject."""
    names = list(dict.fromkeys(shot.characters))
    moves: dict[str, _Move] = {}
    subject: list[str] = names[:1]
    for clause in re.split(r"[.!?;。！？；\n]+", shot.action):
        low = clause.lower()
        named = sorted((low.find(n.lower()), n) for n in names if n.lower() in low)
        if named:
            subject = [named[0][1]]
        elif _GROUP.search(clause):
            subject = names
        kind = next((k for k, pat in _MOVES if re.search(pat, clause, re.I)), "none")
        run, jump, turn = bool(_RUN.search(clause)), bool(_JUMP.search(clause)), bool(_TURN.search(clause))
        if kind == "none" and not (jump or turn):
            continue
        side = -1 if re.search(r"\bleft\b|左", clause, re.I) else 1 if re.search(r"\bright\b|右", clause, re.I) else 0
        for name in subject:
            old = moves.get(name, _Move("none"))
            moves[name] = _Move(kind if kind != "none" else old.kind, old.run or run, old.jump or jump,
                                old.turn or turn, side or old.side)
    return moves


def _speaker_at(shot: Shot, t: float) -> str | None:
    if not shot.dialogue:
        return None
    line = shot.dialogue[min(int(t * len(shot.dialogue)), len(shot.dialogue) - 1)]
    return line.character.strip().upper()


def layout(shot: Shot, *, t: float, width: int, height: int) -> list[Placement]:
    """Where each on-screen character stands at time ``t`` (0 … 1 of the shot), in world pixels.

    Characters spread across the frame; verbs in the action move them (walk, run, enter,
    leave, approach, jump, turn — and 走/跑/进/离开/转身); everyone else breathes and sways a
    little so in-betweening has real motion. Speakers face each other; the current speaker's
    mouth opens and closes with t. A static shot is frozen at t = 0.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"layout: t must be within 0..1, got {t}")
    names = list(dict.fromkeys(shot.characters))
    if not names:
        return []
    t = 0.0 if shot.static else t
    W, H, n = float(width), float(height), len(names)
    fig_h, ground = min(H * 0.36, W * 0.5), H * (0.9 if W >= H else 0.84)
    slots = [0.5] if n == 1 else ([0.38, 0.62] if W >= H else [0.3, 0.7]) if n == 2 else list(np.linspace(0.18, 0.82, n))
    home = [W * (s + 0.03 * ((stable_hash("slot", shot.id, nm) % 201) / 100 - 1)) for s, nm in zip(slots, names)]
    moves = parse_moves(shot)
    speaker = _speaker_at(shot, t)

    # 1. path of each character: start and end x
    paths: list[tuple[float, float]] = []
    for i, name in enumerate(names):
        mv, x0 = moves.get(name, _Move("none")), home[i]
        edge = (-1 if x0 < W / 2 else 1) if mv.side == 0 else mv.side
        off = W / 2 + edge * (W / 2 + fig_h * 0.3)
        dist = W * (0.45 if mv.run else 0.22)
        if mv.kind == "enter":
            paths.append((off, x0))
        elif mv.kind == "leave":
            paths.append((x0, off))
        elif mv.kind == "approach":
            others = [home[j] for j in range(n) if j != i]
            target = min(others, key=lambda o: abs(o - x0)) if others else W / 2
            gap = math.copysign(fig_h * 0.45, x0 - target) if others else 0.0
            end = target + gap if abs(target - x0) > abs(gap) + W * 0.04 else x0 + math.copysign(W * 0.03, target - x0 or 1)
            paths.append((x0, end))
        elif mv.kind == "move":
            way = mv.side or (1 if x0 < W / 2 else -1) if n > 1 else mv.side or (1 if stable_hash("way", shot.id) & 1 else -1)
            paths.append((x0 - way * dist / 2, x0 + way * dist / 2))
        else:
            paths.append((x0, x0))

    # 2. pose at t
    out: list[Placement] = []
    xs = [a + (b - a) * t for a, b in paths]
    for i, name in enumerate(names):
        style, mv = character_style(name), moves.get(name, _Move("none"))
        h = fig_h * style.height
        phase = (stable_hash("phase", shot.id, name) % 1000) / 1000
        a, b = paths[i]
        travel = abs(b - a) * t
        if abs(b - a) > 1e-6:
            facing = 1 if b > a else -1
            swing = (0.6 if mv.run else 0.38) * math.sin(2 * math.pi * (travel / (0.55 * h) + phase))
            x, bob = xs[i], abs(swing) * h * 0.02
        else:
            others = [xs[j] for j in range(n) if j != i]
            facing = (1 if sum(others) / len(others) > xs[i] else -1) if others else (1 if stable_hash("face", name) & 1 else -1)
            breath = math.sin(2 * math.pi * (t * max(shot.duration_s, 1.0) / 2.5 + phase))
            swing, x, bob = 0.08 * breath, xs[i] + W * 0.008 * breath, h * 0.012 * breath
        if mv.turn and t >= 0.5:
            facing = -facing
        lift = h * 0.3 * math.sin(math.pi * t) if mv.jump else 0.0
        speaking = speaker is not None and speaker == name.strip().upper()
        mouth = 0.5 + 0.5 * math.sin(2 * math.pi * (t * shot.duration_s * 3.0 + phase)) if speaking else 0.0
        out.append(Placement(name, x, ground, h, facing, lift, swing, -swing * 0.8, bob, mouth, speaking))
    return out


# --------------------------------------------------------------------------- camera


@dataclass(frozen=True)
class View:
    """A virtual camera: world point (cx, cy) lands in the frame centre, magnified by scale.
    The plate has its own, damped, camera (pscale, pcx, pcy) for multiplane parallax."""

    scale: float
    cx: float
    cy: float
    pscale: float
    pcx: float
    pcy: float
    blur: float = 0.0

    def to_screen(self, x: float, y: float, width: int, height: int) -> tuple[float, float]:
        return (x - self.cx) * self.scale + width / 2, (y - self.cy) * self.scale + height / 2


def focus_character(shot: Shot) -> str | None:
    """The first on-screen speaker, else the first character: who a close-up shows."""
    on = {n.strip().upper(): n for n in shot.characters}
    for line in shot.dialogue:
        if line.character.strip().upper() in on:
            return on[line.character.strip().upper()]
    return shot.characters[0] if shot.characters else None


def frame_camera(shot: Shot, placements: list[Placement], *, width: int, height: int) -> View:
    """Framing from the shot type: establishing shows the whole world; wide a little closer;
    medium the group from the waist up; close-up head and shoulders of the focus character
    at ~60 % of the height; extreme close-up the face."""
    W, H = float(width), float(height)
    cam = shot.camera
    s, cx, cy, k, blur = 1.0, W / 2, H / 2, 1.0, 0.0
    focus = focus_character(shot)
    lead = next((p for p in placements if p.name == focus), None)
    if cam == Camera.WIDE:
        s, cy = 1.18, H - H / (2 * 1.18)  # fixed camera: movement reads on screen
    elif cam == Camera.MEDIUM and placements:
        # waist up (a little looser), centred on the group if it fits, else the focus pair
        u = max(p.unit for p in placements)
        s = 0.8 * 0.9 * H / (2.9 * u)
        fx = lead.x if lead else placements[0].x
        near = sorted(placements, key=lambda p: abs(p.x - fx))
        for group in (placements, near[:2], near[:1]):
            left, right = min(p.x for p in group) - 1.1 * u, max(p.x for p in group) + 1.1 * u
            if (right - left) * s <= W or len(group) == 1:
                break
        top = min(p.ground - p.lift - p.height * 1.02 for p in group)
        cx, cy, k = (left + right) / 2, top + (0.5 - 0.07) * H / s, 0.4
    elif cam == Camera.CLOSE_UP and lead:
        u = lead.unit
        s = min(0.6 * H / (1.4 * u), 0.85 * W / (1.5 * u))
        top = lead.ground - lead.lift - 5.7 * u
        cx, cy, k, blur = lead.x + lead.facing * 0.12 * W / s, top + (0.5 - 0.16) * H / s, 0.35, 0.004
    elif cam == Camera.EXTREME_CLOSE_UP and lead:
        u = lead.unit
        s = min(1.05 * H / u, 1.4 * W / u)
        cx, cy, k, blur = lead.x + lead.facing * 0.08 * u, lead.ground - lead.lift - 4.9 * u, 0.3, 0.008
    elif cam in (Camera.CLOSE_UP, Camera.EXTREME_CLOSE_UP, Camera.MEDIUM):
        s, k = {Camera.MEDIUM: 1.4, Camera.CLOSE_UP: 2.0}.get(cam, 3.0), 1.0
    ps = 1.0 + (s - 1.0) * k
    pcx = min(max(W / 2 + (cx - W / 2) * k, W / (2 * ps)), W - W / (2 * ps))
    pcy = min(max(H / 2 + (cy - H / 2) * k, H / (2 * ps)), H - H / (2 * ps))
    if k == 1.0:
        cx, cy = pcx, pcy  # figures and plate share one camera: feet stay on the ground
    return View(s, cx, cy, ps, pcx, pcy, blur * H)


# --------------------------------------------------------------------------- figures


def _quad(p0: tuple[float, float], p1: tuple[float, float], w0: float, w1: float) -> list[tuple[float, float]]:
    """A limb: a quad from p0 (width w0) to p1 (width w1)."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    ln = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / ln / 2, dx / ln / 2
    return [(p0[0] + nx * w0, p0[1] + ny * w0), (p1[0] + nx * w1, p1[1] + ny * w1),
            (p1[0] - nx * w1, p1[1] - ny * w1), (p0[0] - nx * w0, p0[1] - ny * w0)]


def draw_figure(d: ImageDraw.ImageDraw, p: Placement, to_px) -> None:
    """Draw one character. ``to_px(wx, wy)`` maps world pixels to canvas pixels; figure-local
    coordinates are in head units, x towards the facing side, y up from the ground."""
    st = character_style(p.name)
    u, f = p.unit, p.facing
    base_y = p.ground - p.lift - p.bob

    def P(lx: float, ly: float) -> tuple[float, float]:
        return to_px(p.x + lx * u * f, base_y - ly * u + (p.bob if ly < 2.6 else 0.0))

    def poly(pts, fill, outline=True):
        d.polygon([P(*q) for q in pts], fill=fill, outline=LINE if outline else None, width=lw if outline else 0)

    def ell(cx, cy, rx, ry, fill, outline=True):
        (x0, y0), (x1, y1) = P(cx - rx * f, cy + ry), P(cx + rx * f, cy - ry)
        d.ellipse((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=fill,
                  outline=LINE if outline else None, width=lw if outline else 0)

    sx = abs(P(1, 0)[0] - P(0, 0)[0])  # canvas pixels per head unit
    lw = max(1, round(sx * 0.05))
    skin_sh, top_sh, hair_sh = _shade(st.skin), _shade(st.top), _shade(st.hair)
    leg_col = st.skin if st.skirt else st.bottom

    # 0. contact shadow on the ground, independent of jump height
    gx, gy = to_px(p.x, p.ground)
    d.ellipse((gx - 0.8 * sx, gy - 0.12 * sx, gx + 0.8 * sx, gy + 0.12 * sx), fill=(20, 16, 40, 70))
    # 1. back hair
    if st.hair_shape == "long":
        poly([(-0.62, 5.0), (0.62, 5.0), (0.72, 3.55), (0.0, 3.4), (-0.72, 3.55)], hair_sh)
    elif st.hair_shape == "bob":
        poly([(-0.66, 5.0), (0.66, 5.0), (0.7, 4.3), (-0.7, 4.3)], hair_sh)
    elif st.hair_shape == "ponytail":
        poly([(-0.4, 5.3), (-0.62, 5.4), (-1.05, 4.2), (-0.85, 3.7), (-0.5, 4.6)], hair_sh)
    elif st.hair_shape == "twintails":
        for side in (-1, 1):
            poly([(side * 0.5, 5.3), (side * 0.78, 5.35), (side * 0.95, 4.0), (side * 0.8, 3.6), (side * 0.6, 4.1)], hair_sh)
    # 2. back arm and legs
    sh_b, sh_f = (-0.4, 4.28), (0.4, 4.28)
    hb = (sh_b[0] + 1.5 * math.sin(-p.arm) - 0.05, sh_b[1] - 1.5 * math.cos(p.arm))
    poly(_quad(sh_b, hb, 0.26, 0.2), top_sh)
    ell(hb[0], hb[1], 0.12, 0.12, skin_sh)
    for side, ang, col in ((-1, -p.stride, _shade(leg_col)), (1, p.stride, leg_col)):
        hip = (side * 0.19, 2.75)
        foot = (hip[0] + 2.6 * math.sin(ang), hip[1] - 2.6 * math.cos(ang))
        poly(_quad(hip, foot, 0.32, 0.24), col)
        ell(foot[0] + 0.1, foot[1] + 0.02, 0.2, 0.1, (70, 50, 50) if side > 0 else (50, 36, 40))
    # 3. body: bottom, top with a cel shadow, neck
    if st.skirt:
        poly([(-0.38, 3.2), (0.38, 3.2), (0.66, 2.2), (-0.66, 2.2)], st.bottom)
    else:
        poly([(-0.38, 3.2), (0.38, 3.2), (0.44, 2.55), (-0.44, 2.55)], st.bottom)
    poly([(-0.12, 4.6), (0.12, 4.6), (0.12, 4.2), (-0.12, 4.2)], skin_sh)
    body = [(-0.46, 4.36), (0.46, 4.36), (0.37, 3.05), (-0.37, 3.05)]
    poly(body, st.top)
    poly([(-0.44, 4.3), (-0.14, 4.3), (-0.12, 3.1), (-0.35, 3.1)], top_sh, outline=False)
    poly([(-0.16, 4.36), (0.0, 4.12), (0.16, 4.36)], st.skin)  # collar
    poly(body, None)
    # 4. head, face
    ell(0, 5.0, 0.52, 0.57, st.skin)
    ell(-0.28, 4.72, 0.1, 0.05, (255, 150, 160, 110), outline=False)
    ell(0.34, 4.72, 0.1, 0.05, (255, 150, 160, 110), outline=False)
    for ex in (-0.15, 0.29):
        ell(ex, 4.9, 0.105, 0.15, st.eyes)
        ell(ex, 4.87, 0.06, 0.09, (30, 24, 40), outline=False)
        ell(ex - 0.035 * f, 4.96, 0.04, 0.04, (255, 255, 255), outline=False)
        d.line([P(ex - 0.14, 4.99), P(ex - 0.05, 5.05), P(ex + 0.06, 5.05), P(ex + 0.13, 5.01)], fill=LINE, width=lw * 2, joint="curve")
        d.line([P(ex - 0.09, 5.2), P(ex + 0.09, 5.21)], fill=LINE, width=lw)
    if p.mouth > 0.15:
        poly([(0.01, 4.65), (0.19, 4.65), (0.16, 4.64 - 0.12 * p.mouth), (0.04, 4.64 - 0.12 * p.mouth)], (150, 50, 64))
    else:
        d.line([P(0.04, 4.62), P(0.16, 4.62)], fill=LINE, width=lw)
    # 5. front hair: cap over the skull with bangs, spiky or smooth
    spiky = st.hair_shape == "spiky"
    cap = [(0.6, 4.72)]
    for i in range(13):
        ang = math.radians(-8 + i * 196 / 12)
        r = 1.22 if spiky and i % 2 else 1.0
        cap.append((0.6 * r * math.cos(ang), 5.04 + 0.62 * r * math.sin(ang)))
    cap += [(-0.6, 4.72), (-0.46, 4.95)]
    for i in range(7):
        cap.append((-0.4 + i * 0.14, 5.08 if i % 2 == 0 else 5.27))
    cap.append((0.48, 4.95))
    poly(cap, st.hair)
    shine = tuple(int(c + (255 - c) * 0.45) for c in st.hair)
    poly([(-0.25, 5.47), (0.0, 5.52), (0.3, 5.47), (0.28, 5.42), (0.0, 5.46), (-0.23, 5.41)], shine, outline=False)
    # 6. front arm over the body
    hf = (sh_f[0] + 1.5 * math.sin(p.arm) + 0.05, sh_f[1] - 1.5 * math.cos(p.arm))
    poly(_quad(sh_f, hf, 0.26, 0.2), st.top)
    ell(hf[0], hf[1], 0.12, 0.12, st.skin)


# --------------------------------------------------------------------------- cel render


def plate_for(shot_plan: ShotPlan, width: int, height: int, plate_cache: MutableMapping) -> np.ndarray:
    """The shot's background plate, drawn once per (location, time, setting, size) and kept in
    the caller's cache (an instance-owned dict: the plate-reuse lever)."""
    setting = setting_of(shot_plan.scene_heading, shot_plan.location)
    key = (shot_plan.location, shot_plan.time_of_day, setting, width, height)
    plate = plate_cache.get(key)
    if plate is None:
        plate = background_plate(shot_plan.location, shot_plan.time_of_day, setting, width, height)
        plate.setflags(write=False)
        plate_cache[key] = plate
    return plate


def render_cel(shot_plan: ShotPlan, t: float, width: int, height: int, plate_cache: MutableMapping) -> np.ndarray:
    """A flat cel-style keyframe of the shot at time ``t``: (height, width, 3) uint8 RGB."""
    # 1. scene and camera
    shot = shot_plan.shot
    plate = plate_for(shot_plan, width, height, plate_cache)
    placements = layout(shot, t=t, width=width, height=height)
    view = frame_camera(shot, placements, width=width, height=height)
    # 2. plate through the damped camera, softened in close-ups (depth of field)
    if view.pscale == 1.0 and view.pcx == width / 2 and view.pcy == height / 2:
        frame = plate.copy()
    else:
        m = np.float32([[view.pscale, 0, width / 2 - view.pscale * view.pcx], [0, view.pscale, height / 2 - view.pscale * view.pcy]])
        frame = cv2.warpAffine(plate, m, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    if view.blur >= 0.5:
        frame = cv2.GaussianBlur(frame, (0, 0), view.blur)
    if not placements:
        return frame
    # 3. figures, drawn supersampled inside their bounding box only
    boxes = []
    for p in placements:
        u = p.unit
        x0, y0 = view.to_screen(p.x - 2.2 * u, p.ground - p.lift - 6.2 * u, width, height)
        x1, y1 = view.to_screen(p.x + 2.2 * u, p.ground + 0.3 * u, width, height)
        boxes.append((x0, y0, x1, y1))
    bx0 = max(0, int(math.floor(min(b[0] for b in boxes))))
    by0 = max(0, int(math.floor(min(b[1] for b in boxes))))
    bx1 = min(width, int(math.ceil(max(b[2] for b in boxes))))
    by1 = min(height, int(math.ceil(max(b[3] for b in boxes))))
    if bx1 <= bx0 or by1 <= by0:
        return frame
    crop = cv2.resize(frame[by0:by1, bx0:bx1], ((bx1 - bx0) * SS, (by1 - by0) * SS), interpolation=cv2.INTER_NEAREST)
    canvas = Image.fromarray(crop)
    d = ImageDraw.Draw(canvas, "RGBA")

    def to_px(x: float, y: float) -> tuple[float, float]:
        sx, sy = view.to_screen(x, y, width, height)
        return (sx - bx0) * SS, (sy - by0) * SS

    for p in sorted(placements, key=lambda q: (q.speaking, q.name)):
        draw_figure(d, p, to_px)
    frame[by0:by1, bx0:bx1] = cv2.resize(np.asarray(canvas), (bx1 - bx0, by1 - by0), interpolation=cv2.INTER_AREA)
    return frame
