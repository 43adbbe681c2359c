"""Background plates: the sky, exteriors (skyline or hills, trees, street lamps) and interiors
(walls, floor, a window onto the time of day, furniture) of a location, and the words that
decide them — time of day (``sky_kind``) and inside or outside (``setting_of``).

Not a stage: ``stages.draw`` composes these plates with figures. Layout and palette come from
a sha256 of the location, never from a global RNG, so a location looks the same by day and by
night and the same plate gives the same bytes in every process.
"""
from __future__ import annotations

import hashlib

import cv2
import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]
LINE: RGB = (38, 30, 48)  # line-art colour
SS = 2  # supersampling factor for anti-aliased line art


def _stable_hash(*parts: object) -> int:
    """A 64-bit integer from sha256 of the parts (the same as ``stages.staging.stable_hash``)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def _rng(*parts: object) -> np.random.Generator:
    """A local generator seeded from names (never the global numpy RNG)."""
    return np.random.Generator(np.random.PCG64(_stable_hash(*parts)))


def _shade(c: RGB, k: float = 0.72) -> RGB:
    """The one cel shadow tone of a colour: darker, pushed slightly towards blue."""
    return (int(c[0] * k * 0.92), int(c[1] * k * 0.95), int(min(255, c[2] * k + 14)))


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
