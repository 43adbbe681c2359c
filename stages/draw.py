"""Previz drawing engine: cel-style figures, the cel render of a shot, CJK text.

Not a stage: ``stages.storyboard`` and ``stages.keyframes`` both draw with it. It paints what
``stages.staging`` decides (placements, camera) over the plates of ``stages.backgrounds``.
Everything is deterministic, so the same shot gives the same bytes in every process. Nothing
is cached at module level; callers own the plate cache they pass in.

The plate moves with a damped camera (multiplane parallax), figures with the full one.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import MutableMapping

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stages.records import ShotScene
from stages.backgrounds import LINE, RGB, SS, background_plate, setting_of
from stages.staging import Placement, character_style, figure_box, frame_camera, layout, safe_area


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


CARD_INK, CARD_EDGE = (250, 246, 236), (16, 14, 28)


def card_font_size(text: str, width: int, height: int) -> tuple[int, list[str]]:
    """The largest size (at most a sixth of the frame's short side) at which ``text`` wraps
    into the safe area in at most four lines, with those lines; a text too long for four lines
    at 12 px ends in an ellipsis."""
    x0, y0, x1, y1 = safe_area(width, height)
    box_w, box_h = x1 - x0, y1 - y0
    size = max(12, round(min(width, height) / 6))
    while True:
        font = load_font(size, bold=True)
        lines = wrap_text(text, font, box_w)
        if (len(lines) <= 4 and len(lines) * size * 1.35 <= box_h) or size <= 12:
            return size, fit_lines(lines, 4, font, box_w)
        size = max(12, int(size * 0.9))


def draw_title_card(frame: np.ndarray, text: str) -> np.ndarray:
    """A title card (Fountain centred text, ``>THE END<``): the plate dimmed to a dark ground and
    the text centred in the safe area of the frame's aspect (``staging.safe_area``), wrapped
    (CJK between characters, Latin between words), in bold with a dark edge so it reads on any
    plate. Returns a new RGB uint8 image."""
    height, width = frame.shape[:2]
    ground = (frame.astype(np.float32) * 0.3 + np.float32([12, 10, 24]) * 0.7).astype(np.uint8)
    size, lines = card_font_size(text, width, height)
    font = load_font(size, bold=True)
    x0, y0, x1, y1 = safe_area(width, height)
    canvas = Image.fromarray(ground)
    d = ImageDraw.Draw(canvas)
    step = round(size * 1.35)
    top = (y0 + y1) / 2 - step * (len(lines) - 1) / 2
    edge = max(1, round(size / 14))
    for i, line in enumerate(lines):
        d.text(((x0 + x1) / 2, top + i * step), line, font=font, fill=CARD_INK, anchor="mm",
               stroke_width=edge, stroke_fill=CARD_EDGE)
    return np.asarray(canvas).copy()


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


def plate_for(scene: ShotScene, width: int, height: int, plate_cache: MutableMapping) -> np.ndarray:
    """The shot's background plate, drawn once per (location, time, setting, size) and kept in
    the caller's cache (an instance-owned dict: the plate-reuse lever)."""
    setting = setting_of(scene.heading, scene.location)
    key = (scene.location, scene.time_of_day, setting, width, height)
    plate = plate_cache.get(key)
    if plate is None:
        plate = background_plate(scene.location, scene.time_of_day, setting, width, height)
        plate.setflags(write=False)
        plate_cache[key] = plate
    return plate


def render_cel(scene: ShotScene, t: float, width: int, height: int, plate_cache: MutableMapping) -> np.ndarray:
    """A flat cel-style keyframe of the shot at time ``t``: (height, width, 3) uint8 RGB."""
    # 1. scene and camera
    shot = scene.shot
    plate = plate_for(scene, width, height, plate_cache)
    placements = layout(shot, t=t, width=width, height=height, speech=scene.speech, duration_s=scene.duration_s)
    view = frame_camera(shot, placements, width=width, height=height)
    # 2. plate through the damped camera, softened in close-ups (depth of field)
    if view.pscale == 1.0 and view.pcx == width / 2 and view.pcy == height / 2:
        frame = plate.copy()
    else:
        m = np.float32([[view.pscale, 0, width / 2 - view.pscale * view.pcx], [0, view.pscale, height / 2 - view.pscale * view.pcy]])
        frame = cv2.warpAffine(plate, m, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    if view.blur >= 0.5:
        frame = cv2.GaussianBlur(frame, (0, 0), view.blur)
    if shot.title:
        return draw_title_card(frame, shot.title)
    if not placements:
        return frame
    # 3. figures, drawn supersampled inside their bounding box only
    boxes = [figure_box(p, view, width, height) for p in placements]
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
