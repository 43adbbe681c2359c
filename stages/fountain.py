"""Fountain 1.1 tokenizer: screenplay text → elements with 1-based line numbers.

Not a stage: ``stages.script`` uses it to read screenplays. It never raises on text; every
input yields a (possibly empty) document. ``parse_heading`` splits a scene heading into
setting, location and time of day (shared with the YAML shot list).

Passes, in order:
1. Normalise CRLF/CR to LF and drop a UTF-8 BOM.
2. Cut out boneyard ``/* … */`` (nested, across blank lines). Lines it empties become blank,
   so the text after it keeps its line numbers and its paragraph breaks.
3. Cut out notes ``[[ … ]]`` and keep each as a ``note`` element. Lines a note empties are
   dropped from the line stream (neither blank nor content), so a note between a cue and its
   dialogue does not break the block. Notes may span blank lines (afterwriting does this;
   the spec asks for two spaces instead): a lenient choice, since otherwise the note's text
   turns into action.
4. A title page: after leading blank lines, a block of ``Key: value`` lines (``：`` too) with
   indented continuation lines, holding at least one known key (Title, Author, …), so a
   script that opens with ``CUT TO:`` or ``FADE IN:`` is not mistaken for one.
5. The body, line by line. Line-level forms (``===``, ``#``, ``=``, ``>…<``, ``>``, ``~``)
   first; then, after a blank line, scene headings, transitions and character cues; the rest
   is action. A scene heading need not be followed by a blank line (lenient).

Full-width punctuation is recognised where Fountain syntax uses ASCII: ``：`` for ``:``,
``。`` in heading prefixes (``INT。``), ``（…）`` for extensions and parentheticals. A CJK
line standing alone that ends in ``：`` (``フェードイン：``, ``淡入：``) is a transition —
the spec's ``TO:`` rule cannot apply to scripts without Latin capitals. ``FADE IN:`` is a
transition too: it opens most scripts and would otherwise become a shot. Character cues
without ``@`` in uncased scripts (CJK) must be short and unpunctuated, else every first
line of a multi-line CJK action paragraph would read as a cue. Text keeps its original
characters; emphasis markers (``*``, ``**``, ``***``, ``_``) and ``\\`` escapes are removed.
"""
from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, field

KINDS = ("scene_heading", "action", "character", "dialogue", "parenthetical", "transition",
         "centered", "note", "section", "synopsis", "page_break", "lyrics")
TITLE_KEYS = {"title", "credit", "author", "authors", "source", "draft date", "date",
              "contact", "copyright", "notes", "revision", "episode", "series"}

_HEADING = re.compile(r"^(INT[.。]?/EXT|I[.。]?/E|INT|EXT|EST)(?:[.。]|\s)", re.I)
_SCENE_NUMBER = re.compile(r"\s*#([A-Za-z0-9][A-Za-z0-9.\-]*)#\s*$")
_TITLE_KEY = re.compile(r"^([^\s:：][^:：]*?)\s*[:：]\s*(.*)$")
_EXTENSIONS = re.compile(r"\s*[(（]([^)）]*)[)）]")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_HEADING_PREFIX = re.compile(r"^(INT[.。]?/EXT|I[.。]?/E|INT|EXT|EST)(?:[.。]|\s|$)\s*", re.I)
_TOD_SEPARATOR = re.compile(r"\s+[-–—－]+\s+|--|[–—－]+"
                            r"|(?<=[\u3400-\u9fff\u3040-\u30ff])-(?=[\u3400-\u9fff\u3040-\u30ff])")
_CJK_TIMES = {"日": "DAY", "白天": "DAY", "昼": "DAY", "日间": "DAY", "夜": "NIGHT", "夜晚": "NIGHT",
              "晚上": "NIGHT", "深夜": "NIGHT", "黄昏": "DUSK", "傍晚": "DUSK", "夕方": "DUSK",
              "黎明": "DAWN", "清晨": "DAWN", "早晨": "MORNING", "朝": "MORNING"}
_EMPHASIS = (re.compile(r"(\*{1,3})(?=\S)(.+?)(?<=\S)\1", re.S), re.compile(r"_(?=\S)(.+?)(?<=\S)_", re.S))


@dataclass(frozen=True)
class Element:
    """One screenplay element; ``line`` is 1-based in the original file."""

    kind: str
    text: str
    line: int
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FountainDocument:
    title_page: dict[str, str]
    title_page_line: int | None
    elements: list[Element]


def strip_emphasis(text: str) -> str:
    """Remove Fountain emphasis markers; ``\\*`` and ``\\_`` stay as literal characters."""
    text = text.replace("\\*", "\x00").replace("\\_", "\x01")
    text = _EMPHASIS[0].sub(r"\2", text)
    text = _EMPHASIS[1].sub(r"\1", text)
    return text.replace("\x00", "*").replace("\x01", "_")


def _cut(text: str, open_: str, close: str, nested: bool):
    """Yield (start, end) spans of ``open_ … close`` in text; unterminated openers are text."""
    i = 0
    while (start := text.find(open_, i)) != -1:
        depth, j = 1, start + len(open_)
        while depth and j < len(text):
            if nested and text.startswith(open_, j):
                depth, j = depth + 1, j + len(open_)
            elif text.startswith(close, j):
                depth, j = depth - 1, j + len(close)
            else:
                j += 1
        if depth:
            return
        yield start, j
        i = j


def _remove_spans(text: str, spans, on_empty: str | None) -> tuple[list[str | None], list]:
    """Cut spans out of text, keeping line count. Lines emptied by a cut become ``on_empty``.

    Returns the new lines and, per span, (start line index, inner text, whether the span had
    other text on its lines).
    """
    lines = text.split("\n")
    starts = [0]
    for ln in lines:
        starts.append(starts[-1] + len(ln) + 1)
    out: list[str | None] = list(lines)
    touched: set[int] = set()
    info, cut = [], []
    for a, b in spans:
        la, lb = bisect_right(starts, a) - 1, bisect_right(starts, b - 1) - 1
        cut.append((a, b, la, lb))
        touched.update(range(la, lb + 1))
    for a, b, la, lb in reversed(cut):
        head = (out[la] or "")[: a - starts[la]]
        tail = (out[lb] or "")[b - starts[lb]:]
        inline = bool(head.strip() or tail.strip())
        info.append((la, text[a:b], inline))
        out[la] = head + tail
        for k in range(la + 1, lb + 1):
            out[k] = on_empty
    for k in touched:
        if out[k] is not None and not out[k].strip():
            out[k] = on_empty
        elif out[k] is not None:
            # a cut leaves "word  word"; keep the indentation, collapse the gap
            out[k] = re.sub(r"(?<=\S)[ \t]{2,}(?=\S)", " ", out[k].rstrip())
    return out, list(reversed(info))


def _title_page(lines: list[tuple[int, str]]) -> tuple[dict[str, str], int | None, int]:
    """Parse a title page at the start; returns (fields, first line, index of the body)."""
    i = 0
    while i < len(lines) and not lines[i][1].strip():
        i += 1
    fields: dict[str, str] = {}
    first, key, j = None, None, i
    while j < len(lines) and lines[j][1].strip():
        num, raw = lines[j]
        m = _TITLE_KEY.match(raw)
        if raw[:1] in (" ", "\t") and key:
            value = strip_emphasis(raw.strip())
            fields[key] = f"{fields[key]}\n{value}" if fields[key] else value
        elif m and not raw[:1].isspace():
            key = m.group(1).strip().lower()
            fields[key] = strip_emphasis(m.group(2).strip())
            first = first or num
        else:
            return {}, None, 0
        j += 1
    if not fields or not TITLE_KEYS & fields.keys():
        return {}, None, 0
    return fields, first, j


def _is_cue(s: str) -> bool:
    """An unforced character cue: upper-case name with a letter; short if uncased (CJK)."""
    name = _EXTENSIONS.sub("", s.rstrip("^").rstrip()).strip()
    if not any(c.isalpha() for c in name) or name != name.upper():
        return False
    if any(c.isupper() for c in name):
        return True
    return len(name) <= 12 and not re.search(r"[。！？!?，,、：:；;.…「」『』\"“”]", name)


def _cue(s: str, line: int) -> Element:
    forced = s.startswith("@")
    body = s[1:] if forced else s
    dual = body.rstrip().endswith("^")
    body = body.rstrip().rstrip("^").rstrip()
    extensions = [e.strip() for e in _EXTENSIONS.findall(body)]
    name = _EXTENSIONS.sub("", body).strip()
    return Element("character", s, line, {"name": name, "extension": " ".join(extensions) or None,
                                          "dual": dual, "forced": forced})


def parse_fountain(text: str, path: str) -> FountainDocument:
    """Tokenize Fountain text. ``path`` is only carried for callers' messages; never raises."""
    # 1. line endings and BOM
    text = text.replace("\r\n", "\n").replace("\r", "\n").removeprefix("\ufeff")
    # 2. boneyard: emptied lines become blank
    raw_lines, _ = _remove_spans(text, list(_cut(text, "/*", "*/", nested=True)), "")
    text = "\n".join(raw_lines)
    # 3. notes: emptied lines leave the stream (None)
    note_lines, notes = _remove_spans(text, list(_cut(text, "[[", "]]", nested=False)), None)
    note_elements = [Element("note", body[2:-2].strip(), la + 1, {"inline": inline})
                     for la, body, inline in notes]
    lines = [(k + 1, ln) for k, ln in enumerate(note_lines) if ln is not None]
    # 4. title page
    title_page, title_line, i = _title_page(lines)
    # 5. body
    elements: list[Element] = []
    prev_blank, in_dialogue, speaker = True, False, None

    def add(kind: str, value: str, line: int, **meta) -> None:
        elements.append(Element(kind, value, line, meta))

    while i < len(lines):
        num, raw = lines[i]
        s = raw.strip()
        nxt = lines[i + 1][1] if i + 1 < len(lines) else ""
        i += 1
        if in_dialogue and raw.startswith("  ") and not s and nxt.strip():
            # two spaces keep a dialogue block going across an otherwise blank line
            if elements[-1].kind == "dialogue":
                last = elements.pop()
                elements.append(Element("dialogue", last.text + "\n", last.line, last.meta))
            continue
        if not s:
            prev_blank, in_dialogue = True, False
            continue
        was_blank, prev_blank = prev_blank, False
        if re.fullmatch(r"={3,}", s):
            add("page_break", "", num)
        elif s.startswith("#"):
            level = len(s) - len(s.lstrip("#"))
            add("section", s[level:].strip(), num, level=level)
        elif s.startswith("="):
            add("synopsis", s[1:].strip(), num)
        elif s.startswith(">") and s.endswith("<") and len(s) > 1:
            add("centered", s[1:-1].strip(), num)
        elif s.startswith(">"):
            add("transition", s[1:].strip(), num, forced=True)
        elif s.startswith("~"):
            add("lyrics", s[1:].strip(), num, character=speaker if in_dialogue else None)
            continue  # lyrics keep a dialogue block going
        elif in_dialogue:
            paren = s[:1] in "(（" and s[-1:] in ")）"
            if paren:
                add("parenthetical", s, num, character=speaker)
            elif elements[-1].kind == "dialogue":
                last = elements.pop()
                elements.append(Element("dialogue", last.text + "\n" + s, last.line, last.meta))
            else:
                add("dialogue", s, num, character=speaker)
            continue
        elif was_blank and s.startswith("!"):
            add("action", s[1:], num, forced=True)
        elif (was_blank or elements[-1].kind == "scene_heading") and (
                _HEADING.match(s) or (was_blank and s.startswith(".") and s[1:2].isalnum())):
            forced = s.startswith(".")
            m = _SCENE_NUMBER.search(s)
            heading = (s[:m.start()] if m else s)[1 if forced else 0:].strip()
            add("scene_heading", heading, num, forced=forced, scene_number=m.group(1) if m else None)
            prev_blank = True
        elif was_blank and not nxt.strip() and raw == raw.rstrip() and (
                (s.endswith(("TO:", "TO：")) and s == s.upper()) or s in ("FADE IN:", "FADE IN：")
                or (_CJK.search(s) and s.endswith("：") and len(s) <= 12)):
            add("transition", s, num, forced=False)
        elif was_blank and nxt.strip() and (_cue(s, num).meta["name"] if s.startswith("@") else _is_cue(s)):
            elements.append(_cue(s, num))
            speaker, in_dialogue = elements[-1].meta["name"], True
            continue
        elif not was_blank and elements and elements[-1].kind == "action":
            last = elements.pop()
            elements.append(Element("action", last.text + "\n" + raw.rstrip(),
                                    last.line, last.meta))
        else:
            add("action", raw.rstrip(), num, forced=False)
        in_dialogue = False
    # 6. notes interleave by line: standalone notes before the element they precede,
    # inline notes after the element that holds them
    # emphasis may span the lines of a paragraph, so it is stripped once the paragraph is whole
    elements = [Element(e.kind, strip_emphasis(e.text), e.line, e.meta) for e in elements]
    ranked = [(e.line, 1, k, e) for k, e in enumerate(elements)]
    ranked += [(n.line, 2 if n.meta["inline"] else 0, k, n) for k, n in enumerate(note_elements)]
    return FountainDocument(title_page, title_line, [e for *_, e in sorted(ranked, key=lambda r: r[:3])])


def parse_heading(heading: str, forced: bool) -> tuple[str | None, str, str]:
    """A heading's (setting, location, time of day): 'INT. HOUSE - NIGHT' → ('INT', 'HOUSE', 'NIGHT').

    I/E is INT/EXT and EST is EXT; the time of day is the part after the last " - ", "--",
    full-width dash, or bare "-" between CJK characters, upper-cased, a trailing "(…)" dropped,
    common CJK words mapped (日 → DAY, 夜 → NIGHT, …); DAY when there is none.
    """
    m = None if forced else _HEADING_PREFIX.match(heading)
    setting = None
    if m:
        prefix = m.group(1).upper().replace("。", "").replace(".", "")
        setting = {"I/E": "INT/EXT", "EST": "EXT"}.get(prefix, prefix)
        heading = heading[m.end():].lstrip(" -–—.")
    separators = list(_TOD_SEPARATOR.finditer(heading))
    if not separators:
        return setting, heading.strip(), "DAY"
    last = separators[-1]
    time_of_day = re.sub(r"\s*[(（][^)）]*[)）]\s*$", "", heading[last.end():]).strip().upper()
    return setting, heading[: last.start()].strip(), _CJK_TIMES.get(time_of_day, time_of_day or "DAY")
