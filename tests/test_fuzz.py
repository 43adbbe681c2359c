"""Property-based tests (Hypothesis) of the readers and of profiles (#11.7, the fuzz half).

Two kinds of property:

1. Every generated input is accepted or refused with a project error (AnimError), never
   another exception: Fountain text and raw bytes, YAML shot lists (well-formed with one
   field turned bad, free text, deep nesting), profile files and ``--set`` overrides. An
   accepted script or profile must also plan.
2. The linear rewrites of #11.4 give exactly what the expressions and loops they replaced
   gave: the old code is kept here as the oracle and compared on generated text built from
   the characters each one reacts to. The name index's case folding is checked against the
   regex engine's own case table for every code point.

Examples are derandomized (the same examples on every run, no example database) and kept
small, so the suite takes a few tens of seconds in CI; none asserts a time.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import tomli_w
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.calibration import Calibration
from pipeline.config import parse_overrides, resolve_profile
from pipeline.cost import PriceCatalog
from pipeline.plan import audit_drawing, make_plan
from stages import fountain, script
from stages.records import AnimError, Camera, Episode, ProfileError, Scene, ScriptError, Shot
from stages.script import load_episode

REPO = Path(__file__).resolve().parents[1]
CALIBRATION = Calibration.load(REPO / "cluster" / "calibration.csv")
PRICES = PriceCatalog.load(REPO / "cluster" / "prices.csv", usd_cny=7.10)
DRAFT = resolve_profile("draft")


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def plan(episode: Episode, profile=DRAFT):
    return make_plan(episode, profile, calibration=CALIBRATION, prices=PRICES, script_sha256="0" * 64)


def accepted(path: str, text: str) -> Episode | None:
    """The episode, or None when it is refused with a ScriptError; anything else fails the test."""
    try:
        episode = load_episode(path, text=text)
    except ScriptError as exc:
        assert str(exc).startswith(path), exc  # the message names the file
        assert "\n" not in str(exc).strip() or "invalid YAML" in str(exc), exc
        return None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").count("\n") + 1
    assert episode.shots and all(1 <= s.line <= lines for s in episode.shots)
    assert all(0 < s.duration_s <= script.MAX_SHOT_S for s in episode.shots)
    assert episode.duration_s <= script.MAX_EPISODE_S and len(episode.shots) <= script.MAX_SHOTS
    rendered = plan(episode)
    assert len(rendered.shots) == len(episode.shots) and rendered.total_frames >= len(episode.shots)
    return episode


# --------------------------------------------------------------------------- Fountain

FOUNTAIN_LINES = st.sampled_from([
    "", "", "", "  ", "INT. HOUSE - NIGHT", "EXT. 学校屋顶 - 日", "INT。 病院-日", ".FORCED HEADING #12A#",
    "I/E. CAR - MOVING - DUSK (1979)", "BOB", "@林小雨", "ANA (V.O.)", "BEN ^", "(quietly)", "（小声）",
    "Hello there.", "你好。", "CUT TO:", "FADE IN:", "> THE END <", "> SMASH CUT", "~ la la la",
    "===", "# Act One", "= synopsis", "!FORCED ACTION", "[[shot: close-up, 3s]]", "[[shot: hold]]",
    "[[镜头：特写，3秒]]", "[[shot: 1e400s]]", "[[shot: " + "9" * 400 + "s]]", "[[shot: 600s]]",
    "[[shot: 601s]]", "[[shot:]]", "[[note", "]]", "/*", "*/", "Title: Fuzz", "Author: Me", "    indented",
    "*bold* _under_ ***both***", "\\*escaped\\*", "*a *a *a", "((((((", "#1#", "Ana runs. WIDE.",
    "CLOSE ON Bob.", "特写：手。", "\t", "\ufeff", "Ω σ ς ſ İ ı K",
])


@st.composite
def fountain_text(draw):
    lines = draw(st.lists(st.one_of(FOUNTAIN_LINES, st.text(max_size=30)), max_size=40))
    ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return ending.join(lines)


@fuzz(300)
@given(fountain_text())
def test_fountain_text_is_accepted_or_refused(text):
    accepted("fuzz.fountain", text)


@fuzz(100)
@given(st.binary(max_size=300))
def test_fountain_bytes_are_accepted_or_refused(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "fuzz.fountain"
    path.write_bytes(data)
    try:
        load_episode(path)
    except ScriptError as exc:
        assert str(exc).startswith(str(path))


# --------------------------------------------------------------------------- YAML shot lists

ANY_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
              st.sampled_from([math.inf, -math.inf, math.nan, 1e300, 600.0, 600.01, 0, -1, "", "wide"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)
CAMERAS = st.sampled_from([c.value for c in Camera])
NAMES = st.sampled_from(["MEI", "KAI", "林小雨", "BOB"])


@st.composite
def shot_list(draw):
    shots = st.fixed_dictionaries(
        {"duration": st.floats(0.1, 20), "camera": CAMERAS},
        optional={"characters": st.lists(NAMES, max_size=2), "action": st.text(max_size=20),
                  "dialogue": st.lists(st.fixed_dictionaries({"character": NAMES, "text": st.text(min_size=1, max_size=10)}),
                                       max_size=2),
                  "static": st.booleans()})
    scenes = st.fixed_dictionaries({"heading": st.sampled_from(["EXT. HARBOUR - DUSK", "INT. 教室 - 日", "", "X"]),
                                    "shots": st.lists(shots, min_size=1, max_size=3)},
                                   optional={"location": st.text(max_size=8), "time_of_day": st.text(max_size=5)})
    data = draw(st.fixed_dictionaries({"title": st.text(min_size=1, max_size=10), "scenes": st.lists(scenes, min_size=1, max_size=3)},
                                      optional={"characters": st.lists(NAMES, max_size=4, unique=True)}))
    # turn one value (or none) into anything at all
    path = []
    node = data
    while isinstance(node, (dict, list)) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        path.append((node, key))
        node = node[key]
    if path:
        parent, key = path[-1]
        parent[key] = draw(ANY_VALUE)
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


@fuzz(250)
@given(shot_list())
def test_yaml_shot_lists_are_accepted_or_refused(text):
    accepted("fuzz.yaml", text)


YAML_TEXT = st.lists(st.sampled_from(list("-:[]{}&*!|>'\"#%@`,? \n\tab1.") + ["title: ", "scenes:", "  - ", "shots:",
                                                                                "duration: ", "&a ", "*a"]),
                     max_size=60).map("".join)


@fuzz(200)
@given(YAML_TEXT)
def test_yaml_text_is_accepted_or_refused(text):
    accepted("fuzz.yaml", text)


@fuzz(20)
@given(st.integers(1, 5000), st.sampled_from(["[", "{a: ", "- "]))
def test_yaml_nesting_is_refused_with_a_line_past_the_limit(depth, opener):
    text = opener * depth if opener != "- " else "".join("  " * k + "-\n" for k in range(depth))
    episode = accepted("fuzz.yaml", text)
    assert episode is None


def test_yaml_anchors_that_stand_for_billions_of_values_are_refused():
    laughs = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    laughs += [f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * 10)}]" for k in range(1, 9)]
    with pytest.raises(ScriptError, match=r"fuzz.yaml:6: YAML of more than 1,000,000 values"):
        load_episode("fuzz.yaml", text="\n".join(laughs) + "\ntitle: T\n")


# --------------------------------------------------------------------------- profiles

FIELDS = ["name", "aspect", "short_side", "fps", "animate_on", "keyframe_stride", "hold_static", "storyboard",
          "backend", "interpolation", "crf", "x264_preset", "storyboard_width", "audit", "approval_gate", "nope"]
PLAIN = st.one_of(st.booleans(), st.integers(-10, 10_000), st.integers(), st.floats(allow_nan=False),
                  st.text(max_size=10), st.sampled_from(["16:9", "9:16", "previz", "diffusers", "flow", "crossfade",
                                                          "rife", "veryfast", "ultrafast", "medium"]))
TABLES = st.sampled_from(["flow", "crossfade", "rife", "diffusers", "previz", "unknown"])
TABLE_VALUES = st.dictionaries(st.sampled_from(["preset", "weights", "device", "model", "steps", "num_gpus", "gpu_type",
                                                "strength", "batch_size", "actors", "layered", "other"]),
                               PLAIN, max_size=4)


@st.composite
def profile_data(draw):
    data = draw(st.dictionaries(st.sampled_from(FIELDS), PLAIN, max_size=6))
    data.update(draw(st.dictionaries(TABLES, st.one_of(TABLE_VALUES, PLAIN), max_size=2)))
    return data


def tiny_episode() -> Episode:
    shot = Shot(id="sc01-sh01", scene=1, camera=Camera.MEDIUM, duration_s=2.0, characters=["AYA"],
                action="Aya walks to the window.", line=3)
    return Episode(title="T", source="t.fountain", characters=["AYA"],
                   scenes=[Scene(index=1, heading="INT. ROOM - NIGHT", location="ROOM", line=1, shots=[shot])])


def plans_or_refuses(make_profile):
    try:
        profile = make_profile()
    except ProfileError:
        return
    try:
        rendered = plan(tiny_episode(), profile)
    except AnimError:  # e.g. no calibration row or price for the chosen GPU
        return
    assert rendered.shots[0].frames == round(2.0 * profile.fps)


@fuzz(250)
@given(profile_data())
def test_profile_files_are_accepted_or_refused(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("profiles") / "fuzz.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    plans_or_refuses(lambda: resolve_profile(str(path)))


@fuzz(200)
@given(st.lists(st.one_of(st.text(max_size=20),
                          st.builds(lambda f, v: f"{f}={v}", st.sampled_from(FIELDS + ["flow.preset", "rife.weights",
                                                                                      "diffusers.steps", "a.b.c"]),
                                    st.one_of(st.text(max_size=8), st.integers().map(str), st.sampled_from(
                                        ["1e999", "nan", "inf", "[1,2]", "{a=1}", '"x"', "true", "4096", "4097"])))),
                max_size=4))
def test_set_overrides_are_accepted_or_refused(items):
    def make():
        return resolve_profile("draft", parse_overrides(items))
    plans_or_refuses(make)


# --------------------------------------------------------------------------- the rewrites against the old code

_OLD_EMPHASIS = (re.compile(r"(\*{1,3})(?=\S)(.+?)(?<=\S)\1", re.S), re.compile(r"_(?=\S)(.+?)(?<=\S)_", re.S))


def old_strip_emphasis(text: str) -> str:
    text = text.replace("\\*", "\x00").replace("\\_", "\x01")
    text = _OLD_EMPHASIS[0].sub(r"\2", text)
    text = _OLD_EMPHASIS[1].sub(r"\1", text)
    return text.replace("\x00", "*").replace("\x01", "_")


def chars(alphabet: str, size: int = 40):
    return st.text(alphabet=st.sampled_from(list(alphabet)), max_size=size)


@fuzz(500)
@given(st.one_of(chars("*_ a\\\n\t\u3000b"), chars("**_ a"), st.text(max_size=30)))
def test_emphasis_matches_the_regular_expressions(text):
    assert fountain.strip_emphasis(text) == old_strip_emphasis(text)


_OLD_EXTENSIONS = re.compile(r"\s*[(（]([^)）]*)[)）]")
_OLD_TITLE_KEY = re.compile(r"^([^\s:：][^:：]*?)\s*[:：]\s*(.*)$")
_OLD_SCENE_NUMBER = re.compile(r"\s*#([A-Za-z0-9][A-Za-z0-9.\-]*)#\s*$")


@fuzz(400)
@given(st.one_of(chars("(（)） \ta\u3000"), st.text(max_size=20)))
def test_cue_extensions_match_the_regular_expression(text):
    assert fountain._extensions(text) == (_OLD_EXTENSIONS.sub("", text), _OLD_EXTENSIONS.findall(text))


@fuzz(300)
@given(st.one_of(chars(":： a\tb"), st.text(max_size=20)))
def test_title_keys_match_the_regular_expression(raw):
    raw = raw.replace("\n", " ")  # lines never hold a newline
    m = _OLD_TITLE_KEY.match(raw)
    new = fountain._title_key(raw)
    assert (new is None) == (m is None)
    if m:
        assert (new[0].strip(), new[1].strip()) == (m.group(1).strip(), m.group(2).strip())


@fuzz(300)
@given(st.one_of(chars("#a1.- \tZ"), st.text(max_size=20)))
def test_scene_numbers_match_the_regular_expression(s):
    s = s.replace("\n", " ").strip()  # a heading is one stripped line
    m = _OLD_SCENE_NUMBER.search(s)
    assert fountain._scene_number(s) == ((m.start(), m.group(1)) if m else None)


_OLD_TOD = re.compile(r"\s+[-–—－]+\s+|--|[–—－]+|(?<=[\u3400-\u9fff\u3040-\u30ff])-(?=[\u3400-\u9fff\u3040-\u30ff])")


def old_parse_heading(heading: str, forced: bool):
    m = None if forced else fountain._HEADING_PREFIX.match(heading)
    setting = None
    if m:
        prefix = m.group(1).upper().replace("。", "").replace(".", "")
        setting = {"I/E": "INT/EXT", "EST": "EXT"}.get(prefix, prefix)
        heading = heading[m.end():].lstrip(" -–—.")
    separators = list(_OLD_TOD.finditer(heading))
    if not separators:
        return setting, heading.strip(), "DAY"
    last = separators[-1]
    time_of_day = re.sub(r"\s*[(（][^)）]*[)）]\s*$", "", heading[last.end():]).strip().upper()
    return setting, heading[: last.start()].strip(), fountain._CJK_TIMES.get(time_of_day, time_of_day or "DAY")


@fuzz(500)
@given(st.one_of(chars("INT. -–—－()（）日夜a \t\n"), st.builds(lambda a, b: a + b, st.sampled_from(["INT. ", "EXT. ", "I/E "]),
                                                               chars(" -–()）（日a"))),
       st.booleans())
def test_headings_match_the_regular_expressions(heading, forced):
    assert fountain.parse_heading(heading, forced) == old_parse_heading(heading, forced)


def old_cut(text, open_, close, nested):
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


@fuzz(400)
@given(chars("/*[]a\n", 30))
def test_boneyard_and_note_spans_match_the_old_scan(text):
    for args in (("/*", "*/", True), ("[[", "]]", False)):
        assert list(fountain._cut(text, *args)) == list(old_cut(text, *args))


def old_mentioned(text: str, cast: list[str]) -> list[str]:
    claimed, found = [], []
    for name in sorted(cast, key=len, reverse=True):
        pattern = re.escape(name) if script._CJK.search(name) else rf"(?<!\w){re.escape(name)}(?!\w)"
        for m in re.finditer(pattern, text, re.I):
            if not any(a < m.end() and m.start() < b for a, b in claimed):
                claimed.append(m.span())
                found.append((m.start(), name))
                break
    return [name for _, name in sorted(found)]


TRICKY = "sſSkKKiıİIΣσςιͅΙß林小雨 .-'_1"


@fuzz(500)
@given(st.lists(chars(TRICKY, 6), max_size=6, unique=True), chars(TRICKY + "\n", 50))
def test_cast_mentions_match_trying_every_name(cast, text):
    assert script._Mentions(cast)(text) == old_mentioned(text, cast)


def old_audit_drawing(drawings, keys):
    best, best_gap = None, 0
    for d in drawings:
        if d in keys:
            continue
        gap = min(abs(d - k) for k in keys)
        if gap > best_gap:
            best, best_gap = d, gap
    return best


@fuzz(300)
@given(st.lists(st.integers(0, 60), max_size=30), st.lists(st.integers(0, 60), min_size=1, max_size=8))
def test_audit_drawing_matches_trying_every_keyframe(drawings, keys):
    assert audit_drawing(drawings, keys) == old_audit_drawing(drawings, keys)


def test_case_folding_agrees_with_the_regex_engine_for_every_code_point():
    """Names are looked up by folded spelling, then matched with re.IGNORECASE: every pair of
    characters the engine matches with each other must fold alike, or a mention is missed."""
    sre = pytest.importorskip("_sre")
    casefix = pytest.importorskip("re._casefix")
    word = re.compile(r"\w")
    classes: dict[int, list[str]] = {}
    for code in range(sys.maxunicode + 1):
        if not 0xD800 <= code < 0xE000:
            lower = sre.unicode_tolower(code)
            classes.setdefault(min((lower, *casefix._EXTRA_CASES.get(lower, ()))), []).append(chr(code))
    assert not [c for c in classes.values() if len({script._fold(x) for x in c}) > 1]
    mixed = [c for c in classes.values() if len({bool(word.match(x)) for x in c}) > 1]  # word and non-word
    assert {script._fold(x) for c in mixed for x in c} == {script._MIXED_FOLD}
    cjk = {chr(c) for c in range(0x3040, 0xFB00) if script._CJK.match(chr(c))}
    assert all(c[0] not in cjk or c == [c[0]] for c in classes.values())  # CJK characters are caseless
