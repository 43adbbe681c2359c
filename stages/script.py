"""Script stage: a screenplay (Fountain) or a shot list (YAML) → ``Episode`` (scenes → shots).

``.fountain``, ``.spmd`` and ``.txt`` are read as Fountain 1.1 (``stages.fountain``);
``.yaml``/``.yml`` as a shot list (``stages.shotlist``), whose shots are taken as written.

Breakdown rules for Fountain:

1. Scenes come from scene headings. A heading gives ``setting`` (INT, EXT, INT/EXT; I/E is
   INT/EXT, EST is EXT), ``location`` and ``time_of_day``: the part after the last `` - ``,
   ``--``, full-width dash, or a bare ``-`` between CJK characters, upper-cased, a trailing
   ``(…)`` dropped, common CJK words mapped (日 → DAY, 夜 → NIGHT, 黄昏 → DUSK …); default DAY.
   ``#12A#`` gives the scene number. Story before the first heading forms an implicit first
   scene (heading "", location UNTITLED). A heading with nothing under it gets one static
   establishing shot of 2.5 s.
2. Each action paragraph is one shot. Consecutive dialogue blocks (an exchange, with nothing
   but notes between them) form shots packed greedily at block boundaries up to
   ``max_shot_s``; a block longer than that is split at its lines, and a single line longer
   than that is its own shot lasting its reading time, capped at 15 s. A dual-dialogue
   block (``^``) stays with the block before it and the pair lasts as long as the longer.
3. Duration: dialogue = Latin words / ``words_per_second`` + CJK characters /
   ``cjk_chars_per_second`` + 0.4 s per spoken line; action = Latin words /
   ``action_words_per_second`` + CJK characters / ``cjk_chars_per_second``. Clamped to
   [``min_shot_s``, ``max_shot_s``], rounded to 0.01 s. Parentheticals are not timed.
4. Camera: a shot note wins; else a cue in the action (EXTREME CLOSE/ECU/大特写 →
   extreme-close-up; CLOSE ON/CLOSE-UP/CLOSEUP/CU/特写 → close-up; WIDE/WIDE SHOT/全景/远景 →
   wide; ESTABLISHING → establishing; ANGLE ON/MEDIUM/中景 → medium). Phrases and CJK cues
   count anywhere, in any case; single Latin words (WIDE, CU, …) count anywhere in capitals
   or at the start of the paragraph in any case, so "eyes wide open" is not a camera cue.
   The earliest cue wins. Else the scene's first shot is wide, a dialogue shot with one
   on-screen speaker and one line is a close-up, and everything else is medium.
5. Characters: the on-screen speakers of the shot (V.O./O.S./O.C./画外音/旁白 are heard,
   not seen), then cue names mentioned in the action (whole words, any case; substrings for
   CJK names), in order of appearance. Names are cues without ``@``, extension and ``^``.
6. A note ``[[shot: close-up, 3s, hold]]`` (also ``[[镜头：特写，3秒，定格]]``) on the lines
   right before a paragraph, or inside it, overrides camera and/or duration (an exchange with
   a duration override is one shot) and ``hold``/``static`` makes the shot static. A shot is
   also static when it shows no characters.
7. Sections, synopses, page breaks and other notes are not on screen. Centred text
   (``>THE END<``) is a static wide title card of 2.5 s with no characters (``Shot.title``).
   A transition adds no shot: it is the ``transition_out`` of the shot before it, or, when it
   fades in (``FADE IN:``, 淡入) or no shot precedes it, the ``transition_in`` of the next.
8. Shot ids are ``sc01-sh01``; ``Shot.line`` is where its first paragraph (or cue) starts.

Limits (the ``MAX_*`` constants below, listed in the README under "Limits"): far past any
real episode, so a script beyond one is a mistake, refused with the file, the line and the
limit before anything is planned. Reading is linear in the script: cast names are looked up
through an index of their spellings, not by trying every name on every paragraph.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from stages.records import ScriptError
from stages.records import Camera, DialogueLine, Episode, Scene, Shot
from stages.fountain import Element, FountainDocument, parse_fountain, parse_heading
from stages.shotlist import load_shotlist

VERSION = "1"

# Declared limits: the one place they are set (README "For producers" → "Limits").
MAX_SCRIPT_BYTES = 10_000_000  # a 2-hour feature screenplay is about 250 KB
MAX_LINE_CHARS = 10_000  # one line of the file
MAX_HEADING_CHARS = 500  # one scene heading
MAX_SHOT_S = 600.0  # 10 minutes: the longest shot
MAX_EPISODE_S = 7_200.0  # 2 hours: the longest episode
MAX_SHOTS = 5_000  # shots in one episode (every scene has at least one)
MAX_CHARACTERS = 1_000  # distinct characters in one episode
MAX_YAML_DEPTH = 64  # nesting of a shot list (a valid one nests 7 deep)
MAX_YAML_NODES = 1_000_000  # values of a shot list, each alias counted as what it repeats
MAX_SHORT_SIDE = 2_160  # delivery resolution: the short side of the frame (2160 = 4K UHD)
MAX_STORYBOARD_WIDTH = 4_096  # pixels of one storyboard panel

FOUNTAIN_SUFFIXES = (".fountain", ".spmd", ".txt")
YAML_SUFFIXES = (".yaml", ".yml")
CARD_S = 2.5
LINE_PAUSE_S = 0.4
LONG_LINE_CAP_S = 15.0
ON_SCREEN = {"scene_heading", "action", "character", "centered", "lyrics"}

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_WORD = re.compile(r"\w+(?:['’]\w+)*")
_OFF_SCREEN = re.compile(r"\b(V\.?\s?O|O\.?\s?S|O\.?\s?C)\b|画外|旁白|ナレーション", re.I)
# (pattern, camera, needs caps anywhere-but-start); earlier entries win ties at one position
_CAMERA_CUES = [
    (r"EXTREME CLOSE(?:-?UP)?", Camera.EXTREME_CLOSE_UP, False), (r"大特写", Camera.EXTREME_CLOSE_UP, False),
    (r"ECU", Camera.EXTREME_CLOSE_UP, True), (r"CLOSE ON", Camera.CLOSE_UP, False),
    (r"CLOSE-UP", Camera.CLOSE_UP, False), (r"CLOSEUP", Camera.CLOSE_UP, False),
    (r"特写", Camera.CLOSE_UP, False), (r"CU", Camera.CLOSE_UP, True),
    (r"WIDE SHOT", Camera.WIDE, False), (r"全景|远景", Camera.WIDE, False), (r"WIDE", Camera.WIDE, True),
    (r"ESTABLISHING(?: SHOT)?", Camera.ESTABLISHING, True), (r"ANGLE ON", Camera.MEDIUM, False),
    (r"中景", Camera.MEDIUM, False), (r"MEDIUM(?: SHOT)?", Camera.MEDIUM, True),
]
_CAMERA_PATTERNS = [(re.compile(rf"(?<![\w-]){p}(?![\w-])" if p.isascii() else p, re.I), camera, caps)
                    for p, camera, caps in _CAMERA_CUES]
_NOTE_CAMERAS = {"establishing": Camera.ESTABLISHING, "wide": Camera.WIDE, "全景": Camera.WIDE,
                 "远景": Camera.WIDE, "medium": Camera.MEDIUM, "中景": Camera.MEDIUM,
                 "close-up": Camera.CLOSE_UP, "closeup": Camera.CLOSE_UP, "cu": Camera.CLOSE_UP,
                 "特写": Camera.CLOSE_UP, "extreme-close-up": Camera.EXTREME_CLOSE_UP,
                 "ecu": Camera.EXTREME_CLOSE_UP, "大特写": Camera.EXTREME_CLOSE_UP}
_NOTE_HOLDS = {"hold", "static", "定格", "静止"}
_FADE_IN = re.compile(r"\s*(FADE IN|淡入|渐显|フェードイン)", re.I)


@dataclass(frozen=True)
class _Rates:
    words_per_second: float
    cjk_chars_per_second: float
    action_words_per_second: float
    min_shot_s: float
    max_shot_s: float


@dataclass
class _Override:
    camera: Camera | None = None
    duration: float | None = None
    static: bool = False


@dataclass
class _Unit:
    """One on-screen paragraph: action, a dialogue exchange, or a title card."""

    kind: str
    line: int
    text: str = ""
    blocks: list[list[DialogueLine]] = field(default_factory=list)
    override: _Override | None = None
    transition_in: str | None = None
    transition_out: str | None = None


def load_episode(path: str | Path, *, text: str | None = None, words_per_second: float = 2.6,
                 cjk_chars_per_second: float = 4.5, action_words_per_second: float = 3.0,
                 min_shot_s: float = 1.5, max_shot_s: float = 8.0) -> Episode:
    """Read a screenplay or shot list and break it down into scenes and timed shots.

    ``text`` replaces reading the file (the suffix of ``path`` still picks the format).
    Raises ScriptError, naming the file and line, for anything that is not a usable script.
    """
    rates = _Rates(words_per_second, cjk_chars_per_second, action_words_per_second, min_shot_s, max_shot_s)
    if min(words_per_second, cjk_chars_per_second, action_words_per_second, min_shot_s) <= 0 \
            or min_shot_s > max_shot_s:
        raise ValueError(f"reading rates and shot bounds must be > 0 with min_shot_s <= max_shot_s: {rates}")
    path = Path(path)
    where = str(path)
    suffix = path.suffix.lower()
    if suffix not in FOUNTAIN_SUFFIXES + YAML_SUFFIXES:
        raise ScriptError(where, f"unsupported file type '{suffix}': expected one of "
                                 f"{', '.join(FOUNTAIN_SUFFIXES + YAML_SUFFIXES)}")
    text = _read_text(path) if text is None else text
    if len(text) > MAX_SCRIPT_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_SCRIPT_BYTES:
        raise ScriptError(where, _too_big(len(text.encode("utf-8", "surrogatepass"))))
    if "\x00" in text:
        raise ScriptError(where, "binary file, not a screenplay")
    if not text.strip():
        raise ScriptError(where, "empty file (only whitespace)" if text else "empty file")
    _check_lines(text, where)
    if suffix in YAML_SUFFIXES:
        episode = load_shotlist(text, where, max_depth=MAX_YAML_DEPTH, max_nodes=MAX_YAML_NODES,
                                max_characters=MAX_CHARACTERS)
    else:
        episode = _from_fountain(parse_fountain(text, where), where, path.stem, rates)
    check_limits(episode)
    return episode


def check_limits(episode: Episode) -> None:
    """Refuse an episode past the declared limits, naming its file and the line of the first
    scene or shot past one. ``load_episode`` calls it; so does planning, for episodes made
    some other way."""
    where = episode.source
    total_s, shots, names = 0.0, 0, set()
    for scene in episode.scenes:
        if len(scene.heading) > MAX_HEADING_CHARS:
            raise ScriptError(where, f"scene heading of {len(scene.heading):,} characters; the longest heading "
                                     f"is {MAX_HEADING_CHARS:,}", scene.line)
        for shot in scene.shots:
            shots += 1
            if shots > MAX_SHOTS:
                raise ScriptError(where, f"shot {shot.id} is shot {shots:,}; an episode has at most "
                                         f"{MAX_SHOTS:,} shots: split the script into episodes", shot.line)
            if not shot.duration_s <= MAX_SHOT_S:
                raise ScriptError(where, f"shot {shot.id} lasts {shot.duration_s:g} s; the longest shot is "
                                         f"{_span(MAX_SHOT_S)}: split it", shot.line)
            total_s += shot.duration_s
            if total_s > MAX_EPISODE_S:
                raise ScriptError(where, f"the episode reaches {total_s:,.0f} s at shot {shot.id}; the longest "
                                         f"episode is {_span(MAX_EPISODE_S)}: split the script", shot.line)
            names.update(shot.characters, (d.character for d in shot.dialogue))
            if len(names) > MAX_CHARACTERS:
                raise ScriptError(where, f"shot {shot.id} brings the cast to {len(names):,} characters; an "
                                         f"episode has at most {MAX_CHARACTERS:,}", shot.line)
    if len(episode.characters) > MAX_CHARACTERS:
        raise ScriptError(where, f"{len(episode.characters):,} characters; an episode has at most "
                                 f"{MAX_CHARACTERS:,}")


def _span(seconds: float) -> str:
    return f"{seconds:,g} s ({seconds / 3600:g} h)" if seconds >= 3600 else f"{seconds:,g} s ({seconds / 60:g} min)"


def _too_big(size: int) -> str:
    return f"file of {size:,} bytes; a script is at most {MAX_SCRIPT_BYTES:,} bytes"


def _check_lines(text: str, where: str) -> None:
    """No line longer than MAX_LINE_CHARS (lines counted as the readers count them: CRLF, CR, LF)."""
    if len(text) <= MAX_LINE_CHARS:
        return
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    longest = max(lines, key=len)
    if len(longest) > MAX_LINE_CHARS:
        number = next(k for k, line in enumerate(lines, 1) if len(line) > MAX_LINE_CHARS)
        raise ScriptError(where, f"line of {len(lines[number - 1]):,} characters; a line is at most "
                                 f"{MAX_LINE_CHARS:,}", number)


def _read_text(path: Path) -> str:
    """Bytes → text, with the checks a user needs to fix a bad file."""
    if not path.exists():
        raise ScriptError(str(path), "no such file")
    if not path.is_file():
        raise ScriptError(str(path), "not a file")
    if path.stat().st_size > MAX_SCRIPT_BYTES:
        raise ScriptError(str(path), _too_big(path.stat().st_size))
    data = path.read_bytes()
    if b"\x00" in data:
        raise ScriptError(str(path), "binary file, not a screenplay")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        head = data[: exc.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        line, column = head.count(b"\n") + 1, len(head) - (head.rfind(b"\n") + 1)
        raise ScriptError(str(path), f"invalid UTF-8: byte 0x{data[exc.start]:02x} at column {column + 1} "
                                     f"(byte offset {exc.start} in the file); save the file as UTF-8",
                          line) from None


# --------------------------------------------------------------------------- Fountain


def _from_fountain(doc: FountainDocument, where: str, stem: str, rates: _Rates) -> Episode:
    # 1. something to put on screen
    if not any(e.kind in ON_SCREEN for e in doc.elements):
        if doc.title_page:
            raise ScriptError(where, "title page but no scenes, action or dialogue", doc.title_page_line)
        raise ScriptError(where, "no on-screen content: only sections, synopses, notes or transitions")
    # 2. the cast, in order of first cue
    cues = [e for e in doc.elements if e.kind == "character"]
    cast = list(dict.fromkeys(e.meta["name"].strip() for e in cues))
    if len(cast) > MAX_CHARACTERS:
        seen: set[str] = set()
        extra = next(e for e in cues if seen.add(e.meta["name"].strip()) or len(seen) > MAX_CHARACTERS)
        raise ScriptError(where, f"cue {extra.meta['name'].strip()!r} is character {MAX_CHARACTERS + 1:,}; an "
                                 f"episode has at most {MAX_CHARACTERS:,}", extra.line)
    mentions = _Mentions(cast)
    # 3. elements → scenes of units, 4. units → shots
    scenes = []
    for heading, units in _scene_units(doc.elements, where):
        index = len(scenes) + 1
        if len(heading.text) > MAX_HEADING_CHARS:  # before parse_heading and the drawings see it
            raise ScriptError(where, f"scene heading of {len(heading.text):,} characters; the longest heading "
                                     f"is {MAX_HEADING_CHARS:,}", heading.line)
        setting, location, time_of_day = parse_heading(heading.text, heading.meta.get("forced", False))
        shots = _shots(units, index, mentions, rates)
        if not shots:
            shots = [Shot(id=f"sc{index:02d}-sh01", scene=index, camera=Camera.ESTABLISHING,
                          duration_s=CARD_S, characters=[], action=heading.text, static=True,
                          line=heading.line)]
        scenes.append(Scene(index=index, heading=heading.text, location=location or "UNTITLED",
                            setting=setting, time_of_day=time_of_day, number=heading.meta.get("scene_number"),
                            line=heading.line, shots=shots))
    title = doc.title_page.get("title", "").strip().split("\n")[0].strip() or stem
    return Episode(title=title, source=where, title_page=doc.title_page, characters=cast, scenes=scenes)


def _scene_units(elements: list[Element], where: str) -> list[tuple[Element, list[_Unit]]]:
    """Group elements into (heading, units); story before the first heading gets an implicit one."""
    scenes: list[tuple[Element, list[_Unit]]] = []
    pending: tuple[_Override, int] | None = None  # a shot note waiting for its paragraph
    exchange_open = False  # a new cue joins the current dialogue unit
    cue: Element | None = None  # the cue whose block is being read
    paren: str | None = None
    bring_in: list[str] = []  # transitions waiting for the next unit (rule 7)
    stream = elements + [Element("page_break", "", 0)]  # the sentinel flushes the last block
    for k, e in enumerate(stream):
        in_block = cue is not None and (e.kind in ("parenthetical", "dialogue")
                                        or (e.kind == "lyrics" and e.meta.get("character")))
        if paren and not in_block and e.kind != "note":
            _attach_trailing(scenes[-1][1][-1].blocks[-1], paren)
            paren = None
        units = scenes[-1][1] if scenes else []
        if e.kind == "note":
            override = _shot_note(e, where)
            # a note inside a paragraph, or between a cue and its lines, belongs to that unit
            inside = e.meta["inline"] or (
                cue is not None and stream[k + 1].kind in ("parenthetical", "dialogue", "lyrics"))
            if override and inside and units:
                units[-1].override = override
            elif override:
                pending, exchange_open = (override, e.line), False
            continue
        if e.kind == "scene_heading":
            if pending:
                raise ScriptError(where, "shot note is followed by a scene heading, not a shot; "
                                         "put it right before the paragraph it describes", pending[1])
            scenes.append((e, []))
            exchange_open, cue = False, None
            continue
        if e.kind == "transition":  # no shot of its own: the cut it describes, on a shot (rule 7)
            before = next((u for _, us in reversed(scenes) for u in reversed(us)), None)
            if _FADE_IN.match(e.text) or before is None or bring_in:
                bring_in.append(e.text)
            else:
                before.transition_out = _joined([before.transition_out or "", e.text])
            exchange_open, cue = False, None
            continue
        if not scenes:
            if e.kind not in ON_SCREEN:
                continue
            scenes.append((Element("scene_heading", "", e.line, {}), []))
            units = scenes[-1][1]
        if e.kind == "character":
            if not exchange_open:
                units.append(_Unit("dialogue", e.line, override=pending and pending[0],
                                   transition_in=_joined(bring_in)))
                pending, exchange_open, bring_in = None, True, []
            units[-1].blocks.append([])
            cue, paren = e, None
        elif in_block and e.kind == "parenthetical":
            paren = f"{paren} {e.text}" if paren else e.text
        elif in_block:
            block = units[-1].blocks[-1]
            block.append(DialogueLine(character=cue.meta["name"].strip(), text=" ".join(e.text.split()),
                                      parenthetical=_bare(paren), extension=cue.meta["extension"],
                                      dual=cue.meta["dual"] and not block, line=cue.line))
            paren = None
        elif e.kind in ("action", "lyrics", "centered"):
            kind = "card" if e.kind == "centered" else "action"
            text = " ".join(ln.strip() for ln in e.text.splitlines() if ln.strip())
            units.append(_Unit(kind, e.line, text=text, override=pending and pending[0],
                               transition_in=_joined(bring_in)))
            pending, exchange_open, cue, bring_in = None, False, None, []
        else:  # section, synopsis, page break: off screen, but they end an exchange
            exchange_open, cue = False, None
    if pending:
        raise ScriptError(where, "shot note at the end of the script has no shot to apply to", pending[1])
    return scenes


def _joined(parts: list[str]) -> str | None:
    return " ".join(p for p in parts if p) or None


def _attach_trailing(block: list[DialogueLine], paren: str) -> None:
    """A trailing parenthetical ("Oh, Adam. / (kissing him)") rides on the block's last line;
    one that no line can take (the line has its own) is dropped with the empty block."""
    if block and block[-1].parenthetical is None:
        block[-1] = block[-1].model_copy(update={"parenthetical": _bare(paren)})


def _bare(paren: str | None) -> str | None:
    return paren.strip().lstrip("(（").rstrip(")）").strip() if paren else None


def _shot_note(note: Element, where: str) -> _Override | None:
    """Parse ``[[shot: …]]``/``[[镜头：…]]``; None for any other note."""
    m = re.match(r"^(shot|镜头)\s*[:：]\s*(.*)$", note.text, re.I | re.S)
    if not m:
        return None
    override = _Override()
    words = [w.strip() for w in re.split(r"[,，、]", m.group(2)) if w.strip()]
    if not words:
        raise ScriptError(where, "empty shot note: expected a camera, a duration and/or 'hold'", note.line)
    for word in words:
        low = word.lower()
        seconds = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:s|sec|secs|seconds?|秒)", low)
        if low in _NOTE_CAMERAS:
            override.camera = _NOTE_CAMERAS[low]
        elif seconds and float(seconds.group(1)) > MAX_SHOT_S:
            shown = word if len(word) <= 24 else f"{word[:20]}…{word[-3:]}"
            raise ScriptError(where, f"shot note: {shown} is longer than the longest shot, {_span(MAX_SHOT_S)}; "
                                     "split it into shots", note.line)
        elif seconds and float(seconds.group(1)) > 0:
            override.duration = float(seconds.group(1))
        elif low in _NOTE_HOLDS:
            override.static = True
        else:
            raise ScriptError(where, f"shot note: unknown word '{word}'; accepted: cameras "
                                     f"{', '.join(_NOTE_CAMERAS)}; a duration like 3s or 3秒 (> 0); "
                                     f"{', '.join(sorted(_NOTE_HOLDS))}", note.line)
    return override


def _shots(units: list[_Unit], scene: int, mentions: "_Mentions", rates: _Rates) -> list[Shot]:
    """Turn one scene's units into shots (rules 2–7 of the module docstring)."""
    drafts: list[dict] = []
    for unit in units:
        ov, first = unit.override or _Override(), len(drafts)
        if unit.kind == "card":
            drafts.append(dict(camera=ov.camera or Camera.WIDE, duration_s=ov.duration or CARD_S,
                               characters=[], action=unit.text, dialogue=[], static=True, line=unit.line,
                               title=unit.text))
        elif unit.kind == "action":
            chars = mentions(unit.text)
            seconds = _reading_s(unit.text, rates.action_words_per_second, rates.cjk_chars_per_second)
            camera = ov.camera or _camera_cue(unit.text) or (Camera.WIDE if not drafts else Camera.MEDIUM)
            drafts.append(dict(camera=camera, duration_s=ov.duration or _clamp(seconds, rates),
                               characters=chars, action=unit.text, dialogue=[],
                               static=ov.static or not chars, line=unit.line))
        else:
            for lines, seconds in _pack_exchange(unit.blocks, rates, split=ov.duration is None):
                chars = list(dict.fromkeys(d.character for d in lines
                                           if not (d.extension and _OFF_SCREEN.search(d.extension))))
                if ov.duration:
                    duration = ov.duration
                elif len(lines) == 1 and seconds > rates.max_shot_s:
                    duration = round(min(seconds, LONG_LINE_CAP_S), 2)
                else:
                    duration = _clamp(seconds, rates)
                default = Camera.CLOSE_UP if len(chars) == 1 and len(lines) == 1 else Camera.MEDIUM
                camera = ov.camera or (Camera.WIDE if not drafts else default)
                drafts.append(dict(camera=camera, duration_s=duration, characters=chars, action="",
                                   dialogue=lines, static=ov.static or not chars, line=lines[0].line))
        if len(drafts) > first:
            drafts[first]["transition_in"] = unit.transition_in
            drafts[-1]["transition_out"] = unit.transition_out
    return [Shot(id=f"sc{scene:02d}-sh{n:02d}", scene=scene, **d) for n, d in enumerate(drafts, 1)]


def _pack_exchange(blocks: list[list[DialogueLine]], rates: _Rates, split: bool):
    """Pack dialogue into (lines, seconds) shots at block boundaries, then at line boundaries."""
    line_s = [[_reading_s(d.text, rates.words_per_second, rates.cjk_chars_per_second) + LINE_PAUSE_S
               for d in block] for block in blocks if block]
    # lists grow in place: an exchange of n lines is packed in O(n), not O(n²)
    beats: list[list] = []  # [lines, seconds]
    for block, times in zip([b for b in blocks if b], line_s):
        if block[0].dual and beats:  # simultaneous: the pair lasts as long as the longer block
            beats[-1][0].extend(block)
            beats[-1][1] = max(beats[-1][1], sum(times))
        elif split and sum(times) > rates.max_shot_s:
            beats += [[[d], t] for d, t in zip(block, times)]
        else:
            beats.append([list(block), sum(times)])
    shots: list[list] = []
    for lines, seconds in beats:
        if shots and (not split or shots[-1][1] + seconds <= rates.max_shot_s):
            shots[-1][0].extend(lines)
            shots[-1][1] += seconds
        else:
            shots.append([list(lines), seconds])
    return [(lines, seconds) for lines, seconds in shots]


def _reading_s(text: str, latin_rate: float, cjk_rate: float) -> float:
    cjk = len(_CJK.findall(text))
    latin = len(_WORD.findall(_CJK.sub(" ", text)))
    return latin / latin_rate + cjk / cjk_rate


def _clamp(seconds: float, rates: _Rates) -> float:
    return round(min(max(seconds, rates.min_shot_s), rates.max_shot_s), 2)


def _camera_cue(text: str) -> Camera | None:
    """The earliest camera cue in an action paragraph (rule 4)."""
    best: tuple[int, int, Camera] | None = None
    for rank, (pattern, camera, caps_only) in enumerate(_CAMERA_PATTERNS):
        for m in pattern.finditer(text):
            if caps_only and m.start() > 0 and m.group(0) != m.group(0).upper():
                continue
            if best is None or (m.start(), rank) < best[:2]:
                best = (m.start(), rank, camera)
            break
    return best[2] if best else None


def _fold(text: str) -> str:
    """A spelling key: characters that ``re.IGNORECASE`` matches with each other fold alike
    (lower then upper case; İ, whose lower case is two characters, as I). Checked against the
    regex engine's own case table for every code point in tests/test_fuzz.py."""
    return text.translate(_FOLD_FIRST).lower().upper()


_FOLD_FIRST = {0x130: "I"}
_WORD_RUN = re.compile(r"\w+")
# ι, Ι, ͅ (a combining mark, not a word character) and ι fold alike: a name holding one is
# always tried, since a word boundary may fall inside what it matches
_MIXED_FOLD = "Ι"


class _Mentions:
    """Cast members named in a paragraph, in order of first mention (rule 5). Longer names
    claim their text first, so "CYBER BOB" does not also count as a mention of "BOB".

    Built once per episode. A name's pattern is tried only when the paragraph holds its
    spelling: the first word of a Latin name as a whole word, a CJK name as a substring (both
    case-folded), so each paragraph costs its length plus its candidates, not the cast size.
    """

    def __init__(self, cast: list[str]):
        self.order = sorted(cast, key=len, reverse=True)  # stable: ties keep the order of first cue
        self.rank = {name: k for k, name in enumerate(self.order)}
        self.patterns = {name: re.compile(re.escape(name) if _CJK.search(name) else rf"(?<!\w){re.escape(name)}(?!\w)",
                                          re.I) for name in self.order}
        self.by_word: dict[str, list[str]] = {}
        self.by_spelling: dict[int, dict[str, list[str]]] = {}  # CJK names: folded length -> spelling -> names
        self.always: list[str] = []
        for name in self.order:
            word = _WORD_RUN.search(name)
            if _CJK.search(name):
                spelling = _fold(name)
                self.by_spelling.setdefault(len(spelling), {}).setdefault(spelling, []).append(name)
            elif word and _MIXED_FOLD not in _fold(name):
                self.by_word.setdefault(_fold(word.group()), []).append(name)
            else:
                self.always.append(name)

    def candidates(self, text: str) -> set[str]:
        """Every name that may occur in ``text`` (a superset of those that do)."""
        found = set(self.always)
        if self.by_word:
            for word in set(_fold("\x00".join(_WORD_RUN.findall(text))).split("\x00")):
                found.update(self.by_word.get(word, ()))
        if self.by_spelling and _CJK.search(text):
            folded = _fold(text)
            for n, spellings in self.by_spelling.items():
                present = {folded[i:i + n] for i in range(len(folded) - n + 1)} & spellings.keys()
                for spelling in present:
                    found.update(spellings[spelling])
        return found

    def __call__(self, text: str) -> list[str]:
        claimed: list[tuple[int, int]] = []
        found = []
        for name in sorted(self.candidates(text), key=self.rank.__getitem__):
            for m in self.patterns[name].finditer(text):
                if not any(a < m.end() and m.start() < b for a, b in claimed):
                    claimed.append(m.span())
                    found.append((m.start(), name))
                    break
        return [name for _, name in sorted(found)]
