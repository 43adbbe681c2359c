"""Storyboard stage: one sketch panel per shot, and a contact sheet of an episode's panels.

A panel is what a studio board shows: the shot's composition at its first moment as a grey
line-art sketch inside a frame at the episode aspect (a title card with its text), red arrows
for movement during the shot, the camera label, the transitions written before and after the
shot in its lower corners (``FADE IN:`` left, ``CUT TO:`` right), and a caption below (camera,
duration, action, dialogue).
Drawn with ``stages.draw``; deterministic, CPU only.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image, ImageDraw

from stages.records import ShotScene
from stages.draw import CARD_INK, fit_lines, load_font, render_cel, wrap_text
from stages.staging import frame_camera, layout

VERSION = "4"
ASPECTS = {"16:9": (16, 9), "9:16": (9, 16)}
INK, PENCIL, ARROW, PAPER = (30, 30, 34), (110, 110, 118), (214, 44, 44), (255, 255, 255)
BODY_LINES = 6


def _sketch(cel: np.ndarray) -> np.ndarray:
    """Grey marker wash (three tones) plus pencil edges from the cel image."""
    grey = cv2.cvtColor(cel, cv2.COLOR_RGB2GRAY)
    wash = np.select([grey < 80, grey < 150], [178, 212], 240).astype(np.uint8)
    edges = cv2.Canny(cv2.GaussianBlur(grey, (3, 3), 0), 30, 90) > 0
    wash[edges] = 60
    return np.repeat(wash[:, :, None], 3, axis=2)


def _arrow(d: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float], w: int) -> None:
    d.line([a, b], fill=ARROW, width=w)
    ang, head = math.atan2(b[1] - a[1], b[0] - a[0]), w * 3.5
    left = (b[0] - head * math.cos(ang - 0.45), b[1] - head * math.sin(ang - 0.45))
    right = (b[0] - head * math.cos(ang + 0.45), b[1] - head * math.sin(ang + 0.45))
    d.polygon([b, left, right], fill=ARROW)


def _tag(d: ImageDraw.ImageDraw, at: tuple[float, float], text: str, font, pad: int, anchor: str) -> None:
    """White text on an ink box at ``at`` (PIL anchor): the camera label and the transitions."""
    box = d.textbbox(at, text, font=font, anchor=anchor)
    d.rectangle((box[0] - pad // 2, box[1] - pad // 3, box[2] + pad // 2, box[3] + pad // 3), fill=INK)
    d.text(at, text, font=font, fill=PAPER, anchor=anchor)


def _caption_lines(shot: ShotScene, font, width: float) -> list[tuple[str, str]]:
    """(bold prefix, rest) per caption body line: action first, then dialogue as NAME: text."""
    dialogue: list[tuple[str, str]] = []
    for line in shot.shot.dialogue:
        who = line.character + (f" ({line.parenthetical.strip('() ')})" if line.parenthetical else "") + ": "
        for i, wrapped in enumerate(wrap_text(who + line.text, font, width)):
            dialogue.append((who, wrapped[len(who):]) if i == 0 and wrapped.startswith(who) else ("", wrapped))
    action = [("", s) for s in wrap_text(shot.shot.action, font, width) if s] if shot.shot.action.strip() else []
    room_for_action = max(2, BODY_LINES - len(dialogue)) if action else 0
    if len(action) > room_for_action:
        action = [("", s) for s in fit_lines([s for _, s in action], room_for_action, font, width)]
    body = action + dialogue
    if len(body) > BODY_LINES:
        body = body[: BODY_LINES - 1] + [("", "…")]
    return body


def _metrics(width: int, aspect: str) -> tuple[int, int, int, int]:
    """(frame height, caption font size, line height, padding) of a panel."""
    if aspect not in ASPECTS:
        raise ValueError(f"render_panel: aspect must be one of {sorted(ASPECTS)}, got {aspect!r}")
    if width < 64:
        raise ValueError(f"render_panel: width must be at least 64 pixels, got {width}")
    aw, ah = ASPECTS[aspect]
    fs = max(9, round(width / (30 if aw > ah else 17)))
    return int(round(width * ah / aw)), fs, int(fs * 1.4), max(4, fs // 2)


def panel_shape(width: int, aspect: str) -> tuple[int, int, int]:
    """The (height, width, 3) shape ``render_panel`` returns for this width and aspect."""
    frame_h, _, lh, pad = _metrics(width, aspect)
    return frame_h + 2 * pad + (BODY_LINES + 2) * lh, width, 3


class PrevizStoryboard:
    """The storyboard backend: ``panel = PrevizStoryboard(width=…, aspect=…)(shot)``."""

    name = "previz"

    def __init__(self, *, width: int, aspect: str):
        _metrics(width, aspect)  # check the inputs before any panel is drawn
        self.width, self.aspect = width, aspect

    def __call__(self, shot: ShotScene) -> np.ndarray:
        return render_panel(shot, width=self.width, aspect=self.aspect)


def render_panel(shot: ShotScene, *, width: int, aspect: str) -> np.ndarray:
    """One storyboard panel, RGB uint8 of shape ``panel_shape(width, aspect)``."""
    # 1. check inputs, measure
    frame_h, fs, lh, pad = _metrics(width, aspect)
    caption_h = panel_shape(width, aspect)[0] - frame_h
    regular, bold = load_font(fs), load_font(fs, bold=True)

    # 2. the composition at t = 0 as a sketch, movement arrows from t = 0 to t = 1
    cel = render_cel(shot, 0.0, width, frame_h, {})
    panel = Image.new("RGB", (width, frame_h + caption_h), PAPER)
    sketch = _sketch(cel)
    if shot.shot.title:  # the card's letters in ink, so the board reads like the screen
        sketch[np.abs(cel.astype(np.int16) - CARD_INK).max(axis=2) < 48] = INK
    panel.paste(Image.fromarray(sketch), (0, 0))
    d = ImageDraw.Draw(panel)
    start = layout(shot.shot, t=0.0, width=width, height=frame_h)
    end = layout(shot.shot, t=1.0, width=width, height=frame_h)
    view = frame_camera(shot.shot, start, width=width, height=frame_h)
    aw_px = max(2, width // 120)
    for p0, p1 in zip(start, end):
        ya = p0.ground - 0.55 * p0.height
        a = view.to_screen(p0.x, ya, width, frame_h)
        b = view.to_screen(p1.x, ya, width, frame_h)
        b = (min(max(b[0], 4 * aw_px), width - 4 * aw_px), b[1])
        visible = 0 <= a[0] < width and 0 <= a[1] < frame_h
        if visible and abs(p1.x - p0.x) > width * 0.04:  # real travel, not breathing sway
            _arrow(d, a, b, aw_px)
        jump = max(layout(shot.shot, t=0.5, width=width, height=frame_h)[start.index(p0)].lift, 0.0)
        if jump > 0 and visible:
            top = view.to_screen(p0.x, p0.ground - p0.height, width, frame_h)
            _arrow(d, (top[0] + 3 * aw_px, top[1]), (top[0] + 3 * aw_px, top[1] - jump * view.scale), aw_px)
    label = shot.shot.camera.value.upper()
    _tag(d, (pad + pad // 2, pad), label, bold, pad, "la")
    for text, corner, anchor in ((shot.shot.transition_in, pad + pad // 2, "ld"),
                                 (shot.shot.transition_out, width - pad - pad // 2, "rd")):
        if text:
            fitted = fit_lines(wrap_text(text, bold, width / 2 - 2 * pad), 1, bold, width / 2 - 2 * pad)[0]
            _tag(d, (corner, frame_h - pad), fitted, bold, pad, anchor)
    d.rectangle((0, 0, width - 1, frame_h - 1), outline=INK, width=max(2, width // 200))

    # 3. caption: header, scene heading, action and dialogue
    y, text_w = frame_h + pad, width - 2 * pad
    # No shot id here: ids follow position in the episode, panels follow content only, so an
    # inserted shot does not invalidate every panel after it. The contact sheet stamps the ids.
    header = f"{label} · {shot.shot.duration_s:.1f}s"
    d.text((pad, y), fit_lines(wrap_text(header, bold, text_w), 1, bold, text_w)[0], font=bold, fill=INK)
    y += lh
    heading = fit_lines(wrap_text(shot.heading, regular, text_w), 1, regular, text_w)[0]
    d.text((pad, y), heading, font=regular, fill=PENCIL)
    y += lh
    for prefix, rest in _caption_lines(shot, regular, text_w):
        x = pad
        if prefix:
            d.text((x, y), prefix, font=bold, fill=INK)
            x += bold.getlength(prefix)
        d.text((x, y), rest, font=regular, fill=INK)
        y += lh
    return np.asarray(panel).copy()


def contact_sheet(panels: list[np.ndarray], *, title: str, columns: int | None = None,
                  labels: list[str] | None = None) -> np.ndarray:
    """A grid of panels under a title bar (title, shot count) on white, RGB uint8.

    ``labels`` (usually the shot ids) are stamped on each panel's top-right corner.

    ``columns`` defaults to 4 for landscape panels (16:9 panels, or any image no taller than
    wide) and 6 for portrait ones.
    """
    if not panels:
        raise ValueError("contact_sheet: no panels given")
    shapes = {p.shape for p in panels}
    if len(shapes) != 1 or len(panels[0].shape) != 3 or panels[0].shape[2] != 3:
        raise ValueError(f"contact_sheet: panels must all be RGB of one shape, got {sorted(shapes)}")
    ph, pw, _ = panels[0].shape
    if columns is None:
        columns = 4 if ph <= pw or panels[0].shape == panel_shape(pw, "16:9") else 6
    if columns < 1:
        raise ValueError(f"contact_sheet: columns must be at least 1, got {columns}")
    if labels is not None and len(labels) != len(panels):
        raise ValueError(f"contact_sheet: {len(labels)} labels for {len(panels)} panels")
    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    m = max(8, pw // 24)
    sheet_w = cols * pw + (cols + 1) * m
    fs = max(12, sheet_w // 60)
    title_h = int(fs * 2.4)
    sheet = Image.new("RGB", (sheet_w, title_h + rows * (ph + m) + m), PAPER)
    d = ImageDraw.Draw(sheet)
    bold, regular = load_font(fs, bold=True), load_font(fs)
    label_font = load_font(max(9, pw // 22), bold=True)  # sized to the panel, like its camera label
    count = f"{len(panels)} shot" + ("s" if len(panels) != 1 else "")
    title_w = sheet_w - 3 * m - regular.getlength(count)
    d.text((m, title_h // 2), fit_lines(wrap_text(title, bold, title_w), 1, bold, title_w)[0], font=bold, fill=INK, anchor="lm")
    d.text((sheet_w - m, title_h // 2), count, font=regular, fill=PENCIL, anchor="rm")
    d.line((m, title_h - 2, sheet_w - m, title_h - 2), fill=INK, width=2)
    for i, p in enumerate(panels):
        r, c = divmod(i, cols)
        x, y = m + c * (pw + m), title_h + m + r * (ph + m)
        sheet.paste(Image.fromarray(p), (x, y))
        d.rectangle((x - 1, y - 1, x + pw, y + ph), outline=(200, 200, 204))
        if labels:
            tag = max(4, pw // 60)
            box = d.textbbox((x + pw - 2 * tag, y + 2 * tag), labels[i], font=label_font, anchor="ra")
            d.rectangle((box[0] - tag, box[1] - tag // 2, box[2] + tag, box[3] + tag // 2), fill=INK)
            d.text((x + pw - 2 * tag, y + 2 * tag), labels[i], font=label_font, fill=PAPER, anchor="ra")
    return np.asarray(sheet).copy()
