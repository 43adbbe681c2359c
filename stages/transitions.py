"""Transitions on screen: the fades a script writes around a shot, applied to its frames.

The script stage puts each transition on a shot (``Shot.transition_in`` / ``transition_out``).
A fade (``FADE IN:``, ``FADE OUT.``, ``FADE TO BLACK``, 淡入, 淡出) is drawn here: the shot's
first or last ``FADE_S`` seconds ramp from or to black, frame by frame, on the frames as they
stream into the encoder, so a held drawing fades too and the in-betweener never sees it.
A cut (``CUT TO:``, ``SMASH CUT TO:``) is what the edit already is. A dissolve (``DISSOLVE
TO:``, 叠化) needs the frames of two shots, which are encoded apart: the assembly blends them
on the cut (``stages.assemble.Dissolve``), for as long as the editorial hand-offs declare it
(``stages.handoffs.dissolve_frames``, the one rule; the pipeline hands it to both). So a shot's
clip depends on its fades (``fades``), never on a dissolve: writing one re-assembles the
episode and draws no shot again.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import numpy as np

from stages.records import Shot

VERSION = "1"
FADE_S = 0.5  # a fade's length; shorter in a shot shorter than two fades

_FADE_IN = re.compile(r"FADE\s*IN|淡入|渐显|フェードイン", re.I)
_FADE_OUT = re.compile(r"FADE\s*OUT|FADE\s*TO\s*BLACK|淡出|渐隐|フェードアウト", re.I)
_DISSOLVE = re.compile(r"DISSOLVE|叠化|溶解|オーバーラップ", re.I)


def kind(text: str | None) -> str | None:
    """What a written transition does: 'fade_in', 'fade_out', 'dissolve', 'cut', or None (none
    written)."""
    if not text:
        return None
    if _FADE_OUT.search(text):
        return "fade_out"
    if _FADE_IN.search(text):
        return "fade_in"
    if _DISSOLVE.search(text):
        return "dissolve"
    return "cut"


def fades(shot: Shot) -> tuple[bool, bool]:
    """(fades in, fades out): what of the transitions around ``shot`` its own frames show."""
    fade_in = kind(shot.transition_in) == "fade_in" or kind(shot.transition_out) == "fade_in"
    fade_out = kind(shot.transition_out) == "fade_out" or kind(shot.transition_in) == "fade_out"
    return fade_in, fade_out


def fade_levels(shot: Shot, frames: int, fps: float) -> np.ndarray | None:
    """Each frame's brightness (1 = as drawn, 0 = black) for the fades around ``shot``, or None
    when it has none. A fade in starts at black on the first frame; a fade out ends at black
    on the last."""
    fade_in, fade_out = fades(shot)
    if frames < 1 or not (fade_in or fade_out):
        return None
    ramp = max(1, min(round(FADE_S * fps), frames // 2 if fade_in and fade_out else frames))
    level = np.ones(frames, dtype=np.float32)
    steps = np.arange(ramp, dtype=np.float32) / ramp  # 0, 1/ramp, … (ramp-1)/ramp
    if fade_in:
        level[:ramp] = np.minimum(level[:ramp], steps)
    if fade_out:
        level[frames - ramp:] = np.minimum(level[frames - ramp:], steps[::-1])
    return level


def faded(frames: Iterable[np.ndarray], levels: np.ndarray | None) -> Iterator[np.ndarray]:
    """``frames`` with each multiplied by its level (towards black); unchanged where ``levels``
    is None or 1. Frames past the end of ``levels`` pass unchanged."""
    for i, frame in enumerate(frames):
        if levels is None or i >= len(levels) or levels[i] >= 1.0:
            yield frame
        else:
            yield (frame.astype(np.float32) * levels[i] + 0.5).astype(np.uint8)
