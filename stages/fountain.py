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

Work is linear in the text (``n log n`` where a search bisects): no pattern here is tried
from every position of a line, and paragraphs are joined once. Where a regular expression
would do that on hostile input (a line of 10,000 ``(``, an emphasis marker that never
closes), a small scanner gives exactly the result the expression gives; tests/test_fuzz.py
compares the two on generated text.
"""
from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

KINDS = ("scene_heading", "action", "character", "dialogue", "parenthetical", "transition",
         "centered", "note", "section", "synopsis", "page_break", "lyrics")
TITLE_KEYS = {"title", "credit", "author", "authors", "source", "draft date", "date",
              "contact", "copyright", "notes", "revision", "episode", "series"}

_HEADING = re.compile(r"^(INT[.。]?/EXT|I[.。]?/E|INT|EXT|EST)(?:[.。]|\s)", re.I)
_SCENE_NUMBER = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]*")  # between the #…# at a heading's end
_COLON = re.compile(r"[:：]")
_OPENER, _CLOSER = re.compile(r"[(（]"), re.compile(r"[)）]")
_CUE_PUNCTUATION = re.compile(r"[。！？!?，,、：:；;.…「」『』\"“”]")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_HEADING_PREFIX = re.compile(r"^(INT[.。]?/EXT|I[.。]?/E|INT|EXT|EST)(?:[.。]|\s|$)\s*", re.I)
_TOD_SEPARATOR = re.compile(r"(?<!\s)\s+[-–—－]+\s+|--|[–—－]+"
                            r"|(?<=[\u3400-\u9fff\u3040-\u30ff])-(?=[\u3400-\u9fff\u3040-\u30ff])")
_CJK_TIMES = {"日": "DAY", "白天": "DAY", "昼": "DAY", "日间": "DAY", "夜": "NIGHT", "夜晚": "NIGHT",
              "晚上": "NIGHT", "深夜": "NIGHT", "黄昏": "DUSK", "傍晚": "DUSK", "夕方": "DUSK",
              "黎明": "DAWN", "清晨": "DAWN", "早晨": "MORNING", "朝": "MORNING"}


@dataclass(frozen=True)
class Element:
    """One screenplay element; ``line`` is 1-based in the original file."""

    kind: str
    text: str
    line: int
    meta: dict = field(default_factory=dict)


@dataclass
class _Draft:
    """An element while its lines are read: ``parts`` are joined with newlines at the end."""

    kind: str
    parts: list[str]
    line: int
    meta: dict


@dataclass(frozen=True)
class FountainDocument:
    title_page: dict[str, str]
    title_page_line: int | None
    elements: list[Element]


def strip_emphasis(text: str) -> str:
    """Remove Fountain emphasis markers; ``\\*`` and ``\\_`` stay as literal characters.

    The result is ``re.sub(r"(\\*{1,3})(?=\\S)(.+?)(?<=\\S)\\1", r"\\2", text, flags=re.S)`` followed
    by the same for a single ``_``, computed without trying every later position as a closer
    for every marker that never closes (``*a `` repeated was quadratic).
    """
    text = text.replace("\\*", "\x00").replace("\\_", "\x01")
    text = _strip_marker(text, "*", 3)
    text = _strip_marker(text, "_", 1)
    return text.replace("\x00", "*").replace("\x01", "_")


def _strip_marker(text: str, mark: str, widest: int) -> str:
    """Unwrap ``mark{k}`` … ``mark{k}`` spans, k ≤ ``widest``, as the regular expression would.

    The expression, at each position p left to right: the run of marks at p gives k (the
    widest first, then narrower); the character after the opener is not a space; the span
    closes at the first position e past p + k with k marks at e and no space just before e.
    A match resumes the scan after its closer. Closers are listed once per k and bisected.
    """
    if mark not in text:
        return text
    positions: list[int] = []  # every mark, ascending
    run_end: list[int] = []  # where the run of each mark ends
    closers: list[list[int]] = [[] for _ in range(widest + 1)]
    for run in re.finditer(re.escape(mark) + "+", text):
        a, b = run.span()
        for e in range(a, b):
            positions.append(e)
            run_end.append(b)
            if e and not text[e - 1].isspace():
                for k in range(1, min(widest, b - e) + 1):
                    closers[k].append(e)
    out: list[str] = []
    done, i, n = 0, 0, len(text)
    while i < len(positions):
        p = positions[i]
        for k in range(min(widest, run_end[i] - p), 0, -1):
            if p + k >= n or text[p + k].isspace():
                continue
            j = bisect_left(closers[k], p + k + 1)
            if j < len(closers[k]):
                e = closers[k][j]
                out += (text[done:p], text[p + k:e])
                done = e + k
                i = bisect_left(positions, done)
                break
        else:
            i += 1
    out.append(text[done:])
    return "".join(out)


def _cut(text: str, open_: str, close: str, nested: bool):
    """Yield (start, end) spans of ``open_ … close`` in text; unterminated openers are text.

    Nested: each opener or closer after an opener (the opener tried first at a position)
    deepens or closes it; the span ends where the depth returns to 0.
    """
    tokens = re.compile(f"{re.escape(open_)}|{re.escape(close)}")
    i = 0
    while (start := text.find(open_, i)) != -1:
        if nested:
            depth, j = 1, start
            for m in tokens.finditer(text, start + len(open_)):
                depth += 1 if m.group() == open_ else -1
                if not depth:
                    j = m.end()
                    break
            if depth:
                return
        else:
            end = text.find(close, start + len(open_))
            if end == -1:
                return
            j = end + len(close)
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
        pair = _title_key(raw)
        if raw[:1] in (" ", "\t") and key:
            value = strip_emphasis(raw.strip())
            fields[key] = f"{fields[key]}\n{value}" if fields[key] else value
        elif pair:
            key = pair[0].strip().lower()
            fields[key] = strip_emphasis(pair[1].strip())
            first = first or num
        else:
            return {}, None, 0
        j += 1
    if not fields or not TITLE_KEYS & fields.keys():
        return {}, None, 0
    return fields, first, j


def _title_key(raw: str) -> tuple[str, str] | None:
    """``Key: value`` → (key, value) as ``^([^\\s:：][^:：]*?)\\s*[:：]\\s*(.*)$`` groups them (the
    key up to the first colon, less trailing blanks), or None; one scan, whatever the line."""
    if not raw or raw[0].isspace() or raw[0] in ":：":
        return None
    colon = _COLON.search(raw)
    if not colon:
        return None
    return raw[:colon.start()].rstrip(), raw[colon.end():].lstrip()


def _extensions(s: str) -> tuple[str, list[str]]:
    """(s without its ``(…)`` extensions, their contents): ``sub`` and ``findall`` of
    ``\\s*[(（]([^)）]*)[)）]`` in one left-to-right scan.

    Each match opens at the first opener after the last one and closes at the first closer
    after that; its leading blanks go with it. With no closer after an opener nothing later
    matches either.
    """
    rest, found, i = [], [], 0
    while (opener := _OPENER.search(s, i)) and (closer := _CLOSER.search(s, opener.end())):
        start = opener.start()
        while start > i and s[start - 1].isspace():
            start -= 1
        rest.append(s[i:start])
        found.append(s[opener.end():closer.start()])
        i = closer.end()
    rest.append(s[i:])
    return "".join(rest), found


def _scene_number(s: str) -> tuple[int, str] | None:
    """(where the ``#12A#`` at the end of a heading starts, with the blanks before it; the
    number), as ``\\s*#([A-Za-z0-9][A-Za-z0-9.\\-]*)#\\s*$`` finds it, or None."""
    t = s.rstrip()
    if not t.endswith("#"):
        return None
    j = t.rfind("#", 0, len(t) - 1)
    if j == -1 or not _SCENE_NUMBER.fullmatch(t, j + 1, len(t) - 1):
        return None
    start = j
    while start and t[start - 1].isspace():
        start -= 1
    return start, t[j + 1:-1]


def _is_cue(s: str) -> bool:
    """An unforced character cue: upper-case name with a letter; short if uncased (CJK)."""
    name = _extensions(s.rstrip("^").rstrip())[0].strip()
    if not any(c.isalpha() for c in name) or name != name.upper():
        return False
    if any(c.isupper() for c in name):
        return True
    return len(name) <= 12 and not _CUE_PUNCTUATION.search(name)


def _cue(s: str, line: int) -> Element:
    forced = s.startswith("@")
    body = s[1:] if forced else s
    dual = body.rstrip().endswith("^")
    body = body.rstrip().rstrip("^").rstrip()
    name, found = _extensions(body)
    extensions = [e.strip() for e in found]
    name = name.strip()
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
    # 5. body: each element's lines are collected and joined once it is whole
    elements: list[_Draft] = []
    prev_blank, in_dialogue, speaker = True, False, None

    def add(kind: str, value: str, line: int, **meta) -> None:
        elements.append(_Draft(kind, [value], line, meta))

    while i < len(lines):
        num, raw = lines[i]
        s = raw.strip()
        nxt = lines[i + 1][1] if i + 1 < len(lines) else ""
        i += 1
        if in_dialogue and raw.startswith("  ") and not s and nxt.strip():
            # two spaces keep a dialogue block going across an otherwise blank line
            if elements[-1].kind == "dialogue":
                elements[-1].parts.append("")
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
                elements[-1].parts.append(s)
            else:
                add("dialogue", s, num, character=speaker)
            continue
        elif was_blank and s.startswith("!"):
            add("action", s[1:], num, forced=True)
        elif (was_blank or elements[-1].kind == "scene_heading") and (
                _HEADING.match(s) or (was_blank and s.startswith(".") and s[1:2].isalnum())):
            forced = s.startswith(".")
            number = _scene_number(s)
            heading = (s[:number[0]] if number else s)[1 if forced else 0:].strip()
            add("scene_heading", heading, num, forced=forced, scene_number=number[1] if number else None)
            prev_blank = True
        elif was_blank and not nxt.strip() and raw == raw.rstrip() and (
                (s.endswith(("TO:", "TO：")) and s == s.upper()) or s in ("FADE IN:", "FADE IN：")
                or (_CJK.search(s) and s.endswith("：") and len(s) <= 12)):
            add("transition", s, num, forced=False)
        elif was_blank and nxt.strip() and (_cue(s, num).meta["name"] if s.startswith("@") else _is_cue(s)):
            cue = _cue(s, num)
            elements.append(_Draft(cue.kind, [cue.text], cue.line, cue.meta))
            speaker, in_dialogue = cue.meta["name"], True
            continue
        elif not was_blank and elements and elements[-1].kind == "action":
            elements[-1].parts.append(raw.rstrip())
        else:
            add("action", raw.rstrip(), num, forced=False)
        in_dialogue = False
    # 6. notes interleave by line: standalone notes before the element they precede,
    # inline notes after the element that holds them
    # emphasis may span the lines of a paragraph, so it is stripped once the paragraph is whole
    done = [Element(e.kind, strip_emphasis("\n".join(e.parts)), e.line, e.meta) for e in elements]
    ranked = [(e.line, 1, k, e) for k, e in enumerate(done)]
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
    time_of_day = _without_trailing_paren(heading[last.end():]).strip().upper()
    return setting, heading[: last.start()].strip(), _CJK_TIMES.get(time_of_day, time_of_day or "DAY")


def _without_trailing_paren(text: str) -> str:
    """``re.sub(r"\\s*[(（][^)）]*[)）]\\s*$", "", text)`` without trying every opener: the group
    closes at the last non-blank character and opens at the first opener after the closer
    before it; the blanks before the opener go with it."""
    t = text.rstrip()
    if not t or t[-1] not in ")）":
        return text
    close = len(t) - 1
    previous = max(t.rfind(")", 0, close), t.rfind("）", 0, close))
    opener = _OPENER.search(t, previous + 1, close)
    if not opener:
        return text
    start = opener.start()
    while start and t[start - 1].isspace():
        start -= 1
    return text[:start]
