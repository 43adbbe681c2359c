"""Subtitles a platform can show: ASS styled per speaker with the CJK font, inside the safe area
of the aspect, and the burned-in delivery variant.

The ASS file (pysubs2) has one style per speaker: Noto Sans CJK SC (the font the previz engine
sets text with, package ``manimgx-fonts-cjk``), text tinted with the speaker's colour over a dark
outline of the same hue and a soft shadow (legible over any plate), bottom-centred. Its play
resolution is the video's, and its margins keep text inside the safe area: for 9:16 above the
bottom 22 % and clear of the right-hand 12 % where the phone platforms draw their captions and
buttons, for 16:9 inside the title-safe 90 %. Lines are wrapped here (CJK between any two
characters, Latin at spaces), so the layout does not depend on the renderer's line breaking.

Burning in runs ffmpeg's ``ass`` filter (libass, in imageio-ffmpeg's binary) with ``fontsdir``
pointing at the font's folder, so no system font is needed.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pysubs2

from stages.records import StageError, SubtitleCue

VERSION = "2"  # 2: speaker-tinted text over a dark outline and a shadow
STAGE = "subtitles"
FONT = "Noto Sans CJK SC"
MAX_LINES = 2
_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\u3000-\u303f]")
_NO_LINE_START = set("，。、；：？！」』）》〉,.;:?!)")
# Outline colours for speakers (RGB), in order of first appearance.
_PALETTE = ((40, 90, 200), (200, 60, 90), (30, 140, 90), (160, 90, 200), (210, 120, 30), (40, 150, 170))


def cjk(text: str) -> bool:
    """Whether ``text`` has CJK characters."""
    return bool(_CJK.search(text))


def font_dir() -> Path:
    """The folder holding Noto Sans CJK (package ``manimgx_fonts_cjk``)."""
    import manimgx_fonts_cjk

    return Path(manimgx_fonts_cjk.__file__).parent


def layout(width: int, height: int) -> dict[str, int]:
    """Font size and margins (pixels) for a frame: the safe area of its aspect."""
    vertical = height > width
    size = round(height * 0.04) if vertical else round(height * 0.055)
    return {"fontsize": max(size, 8),
            "margin_l": round(width * (0.08 if vertical else 0.07)),
            "margin_r": round(width * (0.12 if vertical else 0.07)),
            "margin_v": round(height * (0.22 if vertical else 0.06)),
            "outline": max(round(size * 0.12), 1)}


def subtitle_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): where subtitle text can appear, at most ``MAX_LINES`` lines (with the
    outline and line spacing)."""
    lay = layout(width, height)
    line_h = lay["fontsize"] * 1.45
    pad = lay["outline"] + max(lay["outline"] // 2, 1) + 2  # the outline and the shadow's offset
    y1 = height - lay["margin_v"] + pad
    y0 = int(y1 - MAX_LINES * line_h - 2 * pad)
    return lay["margin_l"] - pad, max(y0, 0), width - lay["margin_r"] + pad, y1


def wrap(text: str, max_units: float) -> list[str]:
    """Greedy wrap by width units (a CJK character is 1, a Latin character about 0.55)."""
    def units(s: str) -> float:
        return sum(1.0 if _CJK.match(c) else 0.55 for c in s)

    lines: list[str] = []
    for para in text.split("\n"):
        tokens = re.findall(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\u3000-\u303f]|[^\s\u2e80-\u9fff"
                            r"\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\u3000-\u303f]+|\s+", para)
        line = ""
        for tok in tokens:
            if line and units(line + tok) > max_units and not tok.isspace() and tok not in _NO_LINE_START:
                lines.append(line.rstrip())
                line = ""
            if not (tok.isspace() and not line):
                line += tok
        if line.strip():
            lines.append(line.rstrip())
    return lines or [""]


def speaker_colours(cues: list[SubtitleCue]) -> dict[str, tuple[int, int, int]]:
    """One outline colour per speaker, in order of first appearance (then by name's hash)."""
    names = list(dict.fromkeys(c.character for c in cues))
    out = {}
    for i, name in enumerate(names):
        j = i if i < len(_PALETTE) else int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(_PALETTE)
        out[name] = _PALETTE[j]
    return out


def write_ass(cues: list[SubtitleCue], path: str | Path, *, width: int, height: int, title: str = "") -> None:
    """The cues as an ASS file at ``path``, one style per speaker, wrapped for the frame."""
    lay = layout(width, height)
    subs = pysubs2.SSAFile()
    subs.info.update({"Title": title or "anim-pipeline", "PlayResX": str(width), "PlayResY": str(height),
                      "WrapStyle": "2", "ScaledBorderAndShadow": "yes"})
    subs.styles.clear()
    for name, (r, g, b) in speaker_colours(cues).items():
        subs.styles[_style_name(name)] = pysubs2.SSAStyle(
            fontname=FONT, fontsize=lay["fontsize"], bold=True,
            primarycolor=pysubs2.Color(*(round(255 - (255 - c) * 0.35) for c in (r, g, b))),
            outlinecolor=pysubs2.Color(r // 4, g // 4, b // 4), backcolor=pysubs2.Color(0, 0, 0, 96),
            outline=lay["outline"], shadow=max(lay["outline"] // 2, 1), alignment=pysubs2.Alignment.BOTTOM_CENTER, marginl=lay["margin_l"], marginr=lay["margin_r"],
            marginv=lay["margin_v"])
    per_line = (width - lay["margin_l"] - lay["margin_r"]) / lay["fontsize"]
    for cue in cues:
        if cue.start_s < 0 or cue.end_s <= cue.start_s:
            raise ValueError(f"subtitle cue {cue.index} (shot {cue.shot}): times {cue.start_s}–{cue.end_s} s "
                             "must satisfy 0 <= start < end")
        lines = wrap(cue.text, per_line)
        if len(lines) > MAX_LINES:  # past the safe area's lines: the rest as a smaller-size run
            lines = lines[:MAX_LINES - 1] + ["".join(lines[MAX_LINES - 1:])]
        text = r"\N".join(line.replace("{", "(").replace("}", ")") for line in lines)
        subs.events.append(pysubs2.SSAEvent(start=round(cue.start_s * 1000), end=round(cue.end_s * 1000),
                                            text=text, style=_style_name(cue.character), name=cue.character))
    data = subs.to_string("ass")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def _style_name(character: str) -> str:
    return re.sub(r"[,\s]", "_", character) or "speaker"


def burn_in(video: str | Path, ass: str | Path, out_path: str | Path, *, ffmpeg: str, crf: int = 20,
            preset: str = "veryfast") -> None:
    """``video`` with ``ass`` burned in (its audio copied) at ``out_path``; the file appears only
    when ffmpeg succeeded. ``crf``: the master's; the variant is encoded 5 finer, so that outside
    the subtitles the second generation stays within a few levels of the master."""
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.stem}.part.mp4")
    vf = f"ass=filename={_filter_path(ass)}:fontsdir={_filter_path(font_dir())}"
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(video), "-map", "0:v:0",
           "-map", "0:a?", "-vf", vf, "-c:v", "libx264", "-preset", preset, "-crf", str(max(crf - 5, 0)), "-pix_fmt", "yuv420p",
           "-threads", "1", "-c:a", "copy", "-movflags", "+faststart", str(tmp)]
    result = subprocess.run(cmd, capture_output=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise StageError(STAGE, None, f"burning subtitles into {out_path.name} failed (ffmpeg exit "
                         f"{result.returncode}); nothing written", result.stderr.decode(errors="replace"),
                         transient=result.returncode < 0)
    os.replace(tmp, out_path)


def _filter_path(path: str | Path) -> str:
    """A path as one value of an ffmpeg filter option: ``\\``, ``:`` and ``'`` escaped, quoted."""
    text = str(Path(path).resolve()).replace("\\", "\\\\").replace("'", "'\\\\\\''").replace(":", "\\:")
    return f"'{text}'"
