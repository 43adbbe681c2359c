"""Prompts for the diffusers backend, built from the shot and the series' settings.

A keyframe prompt is the series style + camera words + location and time of day + the
characters with their fixed descriptions + the action. When it does not fit the model's
token limit (CLIP models: 77 tokens including start/end, i.e. 75 for text), parts are
dropped by priority — action detail first (last clause first), then dialogue cues, camera,
place, character descriptions (names stay), and only then the style — so what identifies
the series and its characters survives longest. Models with long text encoders (Qwen-Image)
get the whole prompt. Pure functions, no model needed: the caller passes a token counter
(the pipeline's tokenizer) or gets a conservative word estimate.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from stages.keyframes import DiffusionSettings
from stages.records import Camera, ShotScene

CAMERA_WORDS = {
    Camera.ESTABLISHING: "establishing shot, extreme wide shot, scenery",
    Camera.WIDE: "wide shot, full body",
    Camera.MEDIUM: "medium shot, waist up",
    Camera.CLOSE_UP: "close-up, head and shoulders",
    Camera.EXTREME_CLOSE_UP: "extreme close-up, face",
}
TIME_WORDS = {"DAY": "daytime", "NIGHT": "night", "DUSK": "dusk, sunset", "DAWN": "dawn, early morning",
              "EVENING": "evening", "MORNING": "morning", "SUNSET": "sunset"}
SETTING_WORDS = {"INT": "interior", "EXT": "exterior", "INT/EXT": "interior and exterior"}
NO_PEOPLE = "people, person, character, figure, crowd"
_TOKEN = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\u3040-\u30ff]|\w+|[^\w\s]")

Counter = Callable[[str], int]


def estimate_tokens(text: str) -> int:
    """Conservative CLIP-style count without a tokenizer: words, punctuation marks and each
    CJK character count one token; long words count one per 6 characters (BPE splits them)."""
    return sum(max(1, -(-len(t) // 6)) for t in _TOKEN.findall(text))


def _place(location: str, setting: str | None, time_of_day: str) -> str:
    words = [location.lower()]
    if setting in SETTING_WORDS:
        words.append(SETTING_WORDS[setting])
    words.append(TIME_WORDS.get(time_of_day.upper(), time_of_day.lower()))
    return ", ".join(words)


def _character(name: str, settings: DiffusionSettings, *, described: bool) -> str:
    desc = settings.characters.get(name) or settings.characters.get(name.strip().upper())
    return f"{name.title()} ({desc})" if described and desc else name.title()


def _fit(parts: list[tuple[int, str]], limit: int | None, count: Counter) -> str:
    """Join non-empty parts with ', '; drop the lowest-priority part (highest number, latest
    first) until the prompt fits; finally cut words from the end of what is left."""
    parts = [(p, s) for p, s in parts if s.strip()]
    text = ", ".join(s for _, s in parts)
    while limit is not None and count(text) > limit and len(parts) > 1:
        worst = max(range(len(parts)), key=lambda i: (parts[i][0], i))
        parts.pop(worst)
        text = ", ".join(s for _, s in parts)
    while limit is not None and count(text) > limit and " " in text:
        text = text.rsplit(" ", 1)[0].rstrip(",")
    return text


def shot_prompt(shot: ShotScene, settings: DiffusionSettings, *, max_tokens: int | None,
                count_tokens: Counter | None = None) -> str:
    """The keyframe prompt of a shot, within ``max_tokens`` (None: no limit).

    ``count_tokens`` is the model's own count of text tokens (without start/end tokens);
    without it, ``estimate_tokens``. Priorities (lower survives longer): style 0, character
    names 1, place 2, character descriptions 3, camera 4, dialogue cue 5, action clauses 6+.
    """
    count = count_tokens or estimate_tokens
    s = shot.shot
    names = list(dict.fromkeys(s.characters))
    # Descriptions are a separate part from names, so they can go while names stay.
    described = [(3, ", ".join(_character(n, settings, described=True) for n in names))] if names else []
    bare = [(1, ", ".join(_character(n, settings, described=False) for n in names))] if names else []
    clauses = [c.strip() for c in re.split(r"(?<=[.!?。！？；;])\s*", s.action) if c.strip()]
    speaker = s.dialogue[0].character.title() + " talking" if s.dialogue else ""
    parts = ([(0, settings.style_prompt), (4, CAMERA_WORDS[s.camera])]
             + (described if described else [])
             + [(2, _place(shot.location, shot.setting, shot.time_of_day))]
             + [(6 + i, c.rstrip(".。")) for i, c in enumerate(clauses)] + [(5, speaker)])
    text = _fit(parts, max_tokens, count)
    if described and described[0][1] not in text and bare[0][1] not in text:
        # descriptions were dropped: put the names back in their place (they outrank place)
        parts = [p for p in parts if p not in described]
        parts.insert(2, bare[0])
        text = _fit(parts, max_tokens, count)
    return text


def plate_prompt(location: str, time_of_day: str, setting: str | None, settings: DiffusionSettings, *,
                 max_tokens: int | None, count_tokens: Counter | None = None) -> str:
    """A background plate: the place with nobody in it."""
    parts = [(0, settings.style_prompt), (1, "background art, scenery, no humans"),
             (2, _place(location, setting, time_of_day))]
    return _fit(parts, max_tokens, count_tokens or estimate_tokens)


def sheet_prompt(name: str, settings: DiffusionSettings, *, max_tokens: int | None,
                 count_tokens: Counter | None = None) -> str:
    """A neutral full-body character sheet on a plain background."""
    parts = [(0, settings.style_prompt), (1, _character(name, settings, described=True)),
             (2, "character sheet, full body, standing, front view, plain white background")]
    return _fit(parts, max_tokens, count_tokens or estimate_tokens)


def negative_prompt(settings: DiffusionSettings, *, plate: bool = False) -> str:
    """The profile's negative prompt; plates also push people out of the picture."""
    return f"{settings.negative_prompt}, {NO_PEOPLE}" if plate else settings.negative_prompt
