"""Script stage: the Fountain tokenizer on real third-party fixtures, the shot breakdown, and
the errors a user sees for bad input. Real files only; bad inputs are written to tmp_path."""
from __future__ import annotations

from pathlib import Path

import pytest

from stages.records import ScriptError
from stages.records import Camera, Episode
from stages.fountain import parse_fountain
from stages.script import load_episode

REPO = Path(__file__).resolve().parents[1]
SCREENPLAYS = REPO.parent / "shared" / "data" / "screenplays"
ALL_SCREENPLAYS = sorted(SCREENPLAYS.rglob("*.fountain"))
NY = SCREENPLAYS / "nyousefi_fountain_tests"
SP = SCREENPLAYS / "screenplain_tests"


def tokens(path: Path):
    doc = parse_fountain(path.read_bytes().decode("utf-8"), str(path))
    return doc, [(e.kind, e.text) for e in doc.elements]


def kinds(path: Path, kind: str):
    return [e for e in parse_fountain(path.read_text("utf-8"), str(path)).elements if e.kind == kind]


# --------------------------------------------------------------------------- tokenizer


def test_all_shared_screenplays_are_present():
    assert len(ALL_SCREENPLAYS) >= 35, ALL_SCREENPLAYS


@pytest.mark.parametrize("path", ALL_SCREENPLAYS, ids=lambda p: p.name)
def test_every_shared_screenplay_tokenizes(path):
    doc = parse_fountain(path.read_bytes().decode("utf-8"), str(path))
    assert doc.elements
    n_lines = len(path.read_bytes().decode("utf-8").splitlines())
    assert all(1 <= e.line <= n_lines for e in doc.elements)
    assert [e.line for e in doc.elements] == sorted(e.line for e in doc.elements)


def test_boneyard_vanishes_and_lines_stay_right():
    doc, toks = tokens(NY / "Boneyard.fountain")
    assert toks == [("action", "A line of action."), ("action", "This is an boneyard.")]
    assert doc.elements[1].line == 11
    doc, toks = tokens(SP / "boneyard.fountain")
    assert [k for k, _ in toks] == ["action", "transition", "scene_heading", "action"]
    assert doc.elements[2].line == 20


def test_afterwriting_boneyard_notes_and_title_page():
    path = SCREENPLAYS / "afterwriting_test.fountain"
    doc = parse_fountain(path.read_text("utf-8"), str(path))
    assert doc.title_page_line == 6
    assert doc.title_page["title"] == "Screenplay title\nSecond line"
    assert doc.title_page["author"] == "Author 1,\nAuthor 2 & Author 3"
    assert doc.title_page["contact"] == "e-mail: email@email.com\nphone: +12 34 567 89"
    text = "\n".join(e.text for e in doc.elements)
    assert "gnored" not in text and "/*" not in text and "*/" not in text
    assert not [e for e in doc.elements if 48 <= e.line <= 56]  # the boneyard block
    notes = [e for e in doc.elements if e.kind == "note"]
    assert [n.line for n in notes] == [1, 47, 59]
    assert notes[2].text.endswith("...multiline note")
    assert not any("multiline note" in e.text for e in doc.elements if e.kind == "action")
    by_line = {e.line: e for e in reversed(doc.elements)}  # the first element on each line
    assert by_line[47].text == "Action. Action. Action. Action."
    assert by_line[73].text == "What the f*ck! Escape_escape*escape."
    assert by_line[67].text.startswith("Normal test, underline test, italic test, bold test,")
    assert by_line[75].kind == "centered" and by_line[75].text == "CENTERED, BOLD, UNDERLINE"
    assert by_line[81].kind == "page_break"
    assert by_line[83].kind == "scene_heading" and by_line[83].meta["forced"]
    assert by_line[105].meta["dual"] and by_line[105].meta["name"] == "HERO 2"
    assert by_line[146].kind == "action" and by_line[146].text == "INT. ACTION"
    assert by_line[148].meta["name"] == "McCABE" and by_line[149].kind == "lyrics"
    assert by_line[157].kind == "section" and by_line[157].meta["level"] == 3
    assert by_line[165].kind == "synopsis"


def test_japanese_full_width_punctuation():
    doc, toks = tokens(SCREENPLAYS / "afterwriting_jp.fountain")
    assert doc.title_page == {"title": "映画", "author": "匿名"}
    assert toks[:6] == [("transition", "フェードイン："), ("scene_heading", "INT。 病院-日"),
                        ("action", "ジョン（20）が入院。"), ("character", "ジョン"),
                        ("parenthetical", "（失われた）"), ("dialogue", "この場所は何ですか？")]


def test_title_pages():
    doc, toks = tokens(SP / "title-page.fountain")
    assert doc.title_page == {"title": "My Screenplay", "author": "Your Name",
                              "contact": "your.email@example.com\n(555) 123-4567"}
    assert toks == [("transition", "FADE IN:"), ("action", "SPACE")]
    doc, _ = tokens(NY / "Simple.fountain")
    assert doc.title_page["draft date"] == "2/1/2012"
    doc, _ = tokens(NY / "Transitions.fountain")  # "CUT TO:" first is not a title page
    assert doc.title_page == {}


def test_dialogue_features():
    by_line = {e.line: e for e in kinds(NY / "Dialogue.fountain", "character")}
    assert by_line[4].meta["extension"] == "O.S." and by_line[14].meta["extension"] == "cont'd"
    assert by_line[29].meta["dual"] and by_line[48].meta["name"] == "EVE"
    assert 36 not in by_line  # "23 (O.S.)": a cue needs a letter
    long = [e for e in kinds(NY / "Dialogue.fountain", "dialogue") if e.line == 40][0]
    assert "block\n\nfor absolutely" in long.text  # two spaces keep dialogue going
    assert kinds(SP / "dialogue-with-blank-line.fountain", "dialogue")[0].text == \
        "Dealer gets a seven.\n\nHit or stand sir?"
    assert kinds(SP / "dialogue-character-extension.fountain", "character")[0].meta["extension"] == "on the radio"
    assert kinds(SP / "dual-dialogue.fountain", "character")[1].meta == \
        {"name": "GUY", "extension": None, "dual": True, "forced": False}
    assert [e.text for e in kinds(SP / "parenthetical.fountain", "parenthetical")] == ["(screaming)"]
    _, toks = tokens(NY / "Indenting.fountain")
    assert [k for k, _ in toks] == ["transition", "scene_heading", "action", "character", "dialogue",
                                    "character", "parenthetical", "dialogue", "action"]


def test_scene_headings_and_numbers():
    headings = kinds(NY / "SceneHeaders.fountain", "scene_heading")
    assert len(headings) == 18 and headings[14].text == "KITCHEN" and headings[14].meta["forced"]
    actions = [e.text for e in kinds(NY / "SceneHeaders.fountain", "action")]
    assert actions == ["... not a scene header.", "ESTABLISHING"]
    numbers = [e.meta["scene_number"] for e in kinds(NY / "SceneNumbers.fountain", "scene_heading")]
    assert numbers == ["1", "1A", "1a", "A1", "I-1-A", "1.", "110A"]
    numbers = [e.meta["scene_number"] for e in kinds(SP / "scene-numbers.fountain", "scene_heading")]
    assert numbers == ["1", "2", None, None, "2-B"]


def test_transitions_centered_forced():
    _, toks = tokens(NY / "Transitions.fountain")
    assert toks == [("transition", "CUT TO:"), ("transition", "SMASH CUT TO:"), ("action", "FADE TO BLACK."),
                    ("transition", "NOT A STANDARD TRANSITION:"), ("action", "CUT TO:"),
                    ("transition", "GO TO:"), ("transition", "TO:")]
    _, toks = tokens(NY / "CenteredText.fountain")
    assert toks == [("centered", "Centered"), ("transition", "Not centered"), ("centered", "No space"),
                    ("centered", "Lots of Space")]
    assert tokens(SP / "forced-transition.fountain")[1][0][0] == "transition"
    assert tokens(SP / "forced-action.fountain")[1] == \
        [("action", "THIS IS FORCED ACTION\nThis is another line of action!")]
    _, toks = tokens(NY / "ForcedElements.fountain")
    assert toks == [("action", "BANG\nBANG\nBANG"), ("character", "@McDUCK"), ("dialogue", "I'm vegan."),
                    ("character", "SINGER"), ("lyrics", "These are the songs"), ("lyrics", "That I sing.")]
    _, toks = tokens(NY / "Simple.fountain")
    assert ("action", "CUT TO:") in toks and ("centered", "THE END") in toks  # "CUT TO: " has a trailing space


def test_notes():
    _, toks = tokens(NY / "Notes.fountain")
    assert toks == [("action", "A line."), ("note", "A note."), ("note", "This line spans\n  multiple lines."),
                    ("action", "This is an note."), ("note", "internal")]
    notes = [e for e in parse_fountain((SP / "notes.fountain").read_text(), "n").elements]
    assert [(e.kind, e.text) for e in notes[:4]] == [("action", "Before1 After1"), ("note", "some notes"),
                                                     ("action", "Before2 After2"), ("note", "multiline\nnote\nhere")]
    assert all(e.kind == "note" for e in notes if "paragraph" in e.text and "Note" in e.text)
    assert [e.meta["inline"] for e in notes if e.kind == "note"][:2] == [True, True]


def test_sections_synopses_page_breaks_multiline_action():
    sections = kinds(NY / "SectionHeaders.fountain", "section")
    assert [(e.text, e.meta["level"]) for e in sections][-3:] == [("5", 1), ("Level 2", 2), ("Level 3", 3)]
    assert [e.text for e in kinds(NY / "Synopses.fountain", "synopsis")] == \
        ["This is the first act.", "This is another act.", "THE FINAL ACT"]
    assert [e.line for e in kinds(NY / "PageBreaks.fountain", "page_break")] == [3, 7]
    assert kinds(SP / "page-break.fountain", "page_break")[0].line == 3
    action = kinds(NY / "MultilineAction.fountain", "action")
    assert len(action) == 3 and "WALTER HILL" in action[1].text
    assert [e.text for e in kinds(SP / "indentation.fountain", "action")][0] == "    Four spaces"
    assert [k for k, _ in tokens(NY / "Sections-Complex.fountain")[1]] == \
        ["section", "synopsis", "scene_heading", "section", "section", "scene_heading"]


def test_bom_crlf_cr_and_unicode():
    bom = (SP / "utf-8-bom.fountain").read_bytes()
    assert bom.startswith(b"\xef\xbb\xbf") and b"\r\n" in bom
    doc, toks = tokens(SP / "utf-8-bom.fountain")
    assert toks[0] == ("scene_heading", "EXT. SOMEWHERE - DAY")
    assert toks == tokens(SP / "simple.fountain")[1]
    cr = parse_fountain("INT. A - DAY\r\rBOB\rHi.\r", "cr")
    assert [(e.kind, e.line) for e in cr.elements] == [("scene_heading", 1), ("character", 3), ("dialogue", 4)]
    assert len(tokens(SP / "extended-characters.fountain")[1]) == 1


# --------------------------------------------------------------------------- episodes


def test_cyber_bob_episode():
    ep = load_episode(SCREENPLAYS / "cyber_bob_ep00001_traffic_control_dogs.fountain")
    assert ep.title == "BOB THE CYBER PAWN AND HIS CYBER CLOUD BOSS THING"
    assert [s.location for s in ep.scenes[1:]] == ["PARK", "SUBURBAN TRAFFIC INTERSECTION",
                                                   "TRAFFIC LIGHT HORIZONTAL BEAM"]
    assert [s.time_of_day for s in ep.scenes[1:]] == ["DAY", "DAY", "NIGHT"]
    assert ep.characters[:3] == ["BOB", "DOG", "MARGARET"]
    assert all(0 < s.duration_s <= 15 for s in ep.shots)
    assert len({s.id for s in ep.shots}) == len(ep.shots)
    end = ep.shots[-1]
    assert (end.action, end.camera, end.static, end.duration_s) == ("THE END", Camera.WIDE, True, 2.5)
    assert ep.scenes[1].shots[0].characters == ["CYBER BOB", "DOG", "MARGARET"]  # not BOB inside CYBER BOB
    assert Episode.model_validate_json(ep.model_dump_json()) == ep


def test_example_english_episode():
    ep = load_episode(REPO / "examples" / "episode_en.fountain")
    print(f"episode_en: {len(ep.shots)} shots, {ep.duration_s:.2f} s")
    assert 55 <= ep.duration_s <= 70
    assert [(s.setting, s.time_of_day) for s in ep.scenes] == [("EXT", "DAY"), ("INT", "NIGHT"), ("EXT", "DUSK")]
    assert ep.characters == ["HANA", "TARO"] and ep.title_page["credit"]
    noted = [s for s in ep.shots if s.line == 35][0]
    assert (noted.camera, noted.duration_s) == (Camera.CLOSE_UP, 3.0)
    assert any(d.extension == "V.O." for s in ep.shots for d in s.dialogue)
    assert ep.shots[-1].action == "THE END"


def test_example_chinese_episode():
    ep = load_episode(REPO / "examples" / "episode_zh.fountain")
    print(f"episode_zh: {len(ep.shots)} shots, {ep.duration_s:.2f} s")
    assert 45 <= ep.duration_s <= 75
    assert ep.characters == ["苏婉", "林小雨", "顾言"]
    assert ep.scenes[0].time_of_day == "NIGHT" and ep.scenes[0].location == "顾氏集团顶层宴会厅"
    shots = {s.line: s for s in ep.shots}
    assert shots[8].camera == Camera.WIDE and shots[20].camera == Camera.CLOSE_UP
    assert (shots[11].camera, shots[11].duration_s) == (Camera.CLOSE_UP, 2.0)  # [[镜头：特写，2秒]]
    assert shots[20].characters == ["苏婉"]


def test_example_shotlist():
    ep = load_episode(REPO / "examples" / "shotlist.yaml")
    print(f"shotlist: {len(ep.shots)} shots, {ep.duration_s:.2f} s")
    assert len(ep.shots) == 5 and ep.duration_s == pytest.approx(15.0)
    assert ep.characters == ["MEI", "KAI"]
    assert [s.line for s in ep.shots] == [9, 15, 23, 29, 35]
    assert ep.shots[1].dialogue[0].parenthetical == "softly" and ep.shots[3].dialogue[0].extension == "O.S."
    assert ep.scenes[1].location == "STONE BRIDGE" and ep.scenes[1].time_of_day == "NIGHT"


# --------------------------------------------------------------------------- breakdown rules


def episode(tmp_path, body: str, name: str = "t.fountain", **kw) -> Episode:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return load_episode(path, **kw)


def test_durations_clamp_and_cjk_vs_latin(tmp_path):
    ep = episode(tmp_path, "INT. ROOM - NIGHT\n\nThe lamp hums.\n\n" + "Word " * 60 + "\n\n"
                 "BOB\nOne two three four five six seven eight nine ten eleven twelve thirteen.\n\n"
                 "@林小雨\n一二三四五六七八九十。\n")
    short, long, latin, cjk = ep.shots
    assert short.duration_s == 1.5 and long.duration_s == 8.0
    assert latin.duration_s == round(13 / 2.6 + 0.4, 2)
    assert cjk.duration_s == round(10 / 4.5 + 0.4, 2)
    assert ep.scenes[0].shots[0].static  # nobody on screen
    mixed = episode(tmp_path, "@林小雨\nOK 好的好的 fine\n", words_per_second=2.0, cjk_chars_per_second=4.0)
    assert mixed.shots[0].duration_s == round(2 / 2.0 + 4 / 4.0 + 0.4, 2)
    assert mixed.scenes[0].location == "UNTITLED" and mixed.scenes[0].heading == ""


def test_exchange_splits_at_blocks_and_long_lines(tmp_path):
    line = "one two three four five six seven eight nine ten"  # 10 words: 3.85 s + 0.4
    body = "INT. A - DAY\n\nAna waits.\n\n" + "".join(f"{n}\n{line}\n\n" for n in ["ANA", "BEN", "ANA", "BEN"])
    body += "BEN\n" + " ".join(["word"] * 50) + "\n"
    shots = episode(tmp_path, body).shots[1:]
    assert [len(s.dialogue) for s in shots] == [1, 1, 1, 1, 1]  # 4.25 + 4.25 > 8: one block a shot
    assert shots[-1].duration_s == 15.0  # 50 words alone: 19.6 s, capped
    short = episode(tmp_path, "ANA\nHi.\n\nBEN\nHey.\n\nANA\nBye.\n").shots
    assert len(short) == 1 and short[0].camera == Camera.WIDE and short[0].characters == ["ANA", "BEN"]


def test_camera_cues_and_defaults(tmp_path):
    ep = episode(tmp_path, "EXT. FIELD - DAY\n\nAna runs.\n\nCLOSE ON Ana's hand.\n\nECU: an eye.\n\n"
                 "Her eyes go wide.\n\nThe field, WIDE.\n\nANGLE ON the gate.\n\n特写：手。\n\n"
                 "大特写：眼睛。\n\nANA\nHello.\n\nANA\nTwo.\nLines here.\n\nBEN (V.O.)\nHear me.\n")
    cams = [s.camera for s in ep.shots]
    assert cams == [Camera.WIDE, Camera.CLOSE_UP, Camera.EXTREME_CLOSE_UP, Camera.MEDIUM, Camera.WIDE,
                    Camera.MEDIUM, Camera.CLOSE_UP, Camera.EXTREME_CLOSE_UP, Camera.MEDIUM]
    dialogue = ep.shots[-1]
    assert [d.character for d in dialogue.dialogue] == ["ANA", "ANA", "BEN"]
    assert dialogue.characters == ["ANA"]  # BEN is a voice-over, heard not seen
    solo = episode(tmp_path, "INT. A - DAY\n\nAna sits.\n\nANA\nHello.\n").shots[1]
    assert solo.camera == Camera.CLOSE_UP


def test_empty_scene_gets_establishing_shot(tmp_path):
    ep = episode(tmp_path, "EXT. CITY - NIGHT #4#\n\nINT. FLAT - DAY\n\nAna sleeps.\n")
    first = ep.scenes[0]
    assert first.number == "4" and first.shots[0].camera == Camera.ESTABLISHING
    assert first.shots[0].duration_s == 2.5 and first.shots[0].static
    assert ep.shots[1].id == "sc02-sh01" and ep.shots[1].line == 5


def test_shot_note_override(tmp_path):
    ep = episode(tmp_path, "INT. A - DAY\n\nAna enters.\n\n[[shot: close-up, 3s]]\nAna looks around slowly.\n\n"
                 "Ana smiles. [[shot: wide, hold]]\n\n[[shot: 2.5s]]\nANA\nHi.\n\nBEN\nHello there.\n")
    _, noted, inline, talk = ep.shots
    assert (noted.camera, noted.duration_s, noted.static, noted.line) == (Camera.CLOSE_UP, 3.0, False, 6)
    assert (inline.camera, inline.static, inline.characters) == (Camera.WIDE, True, ["ANA"])
    assert talk.duration_s == 2.5 and len(talk.dialogue) == 2


def test_headings_parse(tmp_path):
    ep = episode(tmp_path, "I/E. CAR - MOVING - DUSK\n\nA.\n\nEST. TOWN\n\nB.\n\n.DREAMSCAPE\n\nC.\n\n"
                 "INT. HOUSE - DAY (1979)\n\nD.\n")
    assert [(s.setting, s.location, s.time_of_day) for s in ep.scenes] == [
        ("INT/EXT", "CAR - MOVING", "DUSK"), ("EXT", "TOWN", "DAY"), (None, "DREAMSCAPE", "DAY"),
        ("INT", "HOUSE", "DAY")]


# --------------------------------------------------------------------------- bad input


def raises(path: Path, expected: str, **kw):
    with pytest.raises(ScriptError) as info:
        load_episode(path, **kw)
    assert str(info.value) == expected, str(info.value)
    return info.value


def test_bad_files(tmp_path):
    raises(tmp_path / "nope.fountain", f"{tmp_path / 'nope.fountain'}: no such file")
    for name, data, problem in [
        ("empty.fountain", b"", "empty file"),
        ("blank.fountain", b"  \n\t\n", "empty file (only whitespace)"),
        ("bin.fountain", b"\x89PNG\r\n\x1a\n\x00\x00", "binary file, not a screenplay"),
        ("other.docx", b"x", "unsupported file type '.docx': expected one of .fountain, .spmd, .txt, .yaml, .yml"),
    ]:
        (tmp_path / name).write_bytes(data)
        raises(tmp_path / name, f"{tmp_path / name}: {problem}")
    bad = tmp_path / "latin1.fountain"
    bad.write_bytes("INT. CAFÉ - DAY\r\n\r\nBob.\r\n".encode("utf-8") + "Zoë sits.\n".encode("latin-1"))
    err = raises(bad, f"{bad}:4: invalid UTF-8: byte 0xeb at column 3 (byte offset 28 in the file); "
                      "save the file as UTF-8")
    assert err.line == 4


def test_script_without_story(tmp_path):
    path = tmp_path / "title.fountain"
    path.write_text("\n\nTitle: Lonely\nAuthor: Me\n\n> FADE OUT.\n", encoding="utf-8")
    raises(path, f"{path}:3: title page but no scenes, action or dialogue")
    path.write_text("# Act One\n\n= Setup\n\n[[todo]]\n", encoding="utf-8")
    raises(path, f"{path}: no on-screen content: only sections, synopses, notes or transitions")
    load_episode(path, text="\ufeffINT. A - DAY\n")  # text= replaces the file; a BOM is fine


def test_bad_shot_notes(tmp_path):
    path = tmp_path / "notes.fountain"
    path.write_text("INT. A - DAY\n\nAna.\n\n[[shot: close-up, dolly]]\nAna runs.\n", encoding="utf-8")
    err = raises(path, f"{path}:5: shot note: unknown word 'dolly'; accepted: cameras establishing, wide, 全景, "
                       "远景, medium, 中景, close-up, closeup, cu, 特写, extreme-close-up, ecu, 大特写; "
                       "a duration like 3s or 3秒 (> 0); hold, static, 定格, 静止")
    assert err.line == 5
    with pytest.raises(ScriptError, match=r":3: shot note: unknown word '0s'"):
        load_episode(path, text="Ana.\n\n[[shot: 0s]]\nAna runs.\n")
    with pytest.raises(ScriptError, match=r":3: shot note at the end"):
        load_episode(path, text="Ana.\n\n[[shot: wide]]\n")


def test_bad_shotlists(tmp_path):
    good = (REPO / "examples" / "shotlist.yaml").read_text(encoding="utf-8")
    path = tmp_path / "shots.yaml"
    cases = [
        (good.replace("duration: 2.0", "duration: 0"), 23,
         "scenes[0].shots[2].duration: Input should be greater than 0"),
        (good.replace("camera: wide", "camera: dolly"), 30,
         "scenes[1].shots[0].camera: Input should be 'establishing', 'wide', 'medium', 'close-up' "
         "or 'extreme-close-up'"),
        (good.replace("static: true", "static: true\n        colour: red"), 15,
         "scenes[0].shots[0].colour: Extra inputs are not permitted"),
        (good.replace("characters: [KAI, MEI]", "characters: [KAI, MAY]"), 31,
         "scenes[1].shots[0].characters[1]: 'MAY' is not in the top-level characters list ['MEI', 'KAI']"),
        (good.replace("title: Lantern Festival Teaser\n", ""), 2, "title: Field required"),
        (good.replace("  - heading: EXT. STONE BRIDGE - NIGHT", "  - heading: [unclosed"), 28,
         "invalid YAML: expected ',' or ']', but got ':'"),
    ]
    for text, line, problem in cases:
        path.write_text(text, encoding="utf-8")
        raises(path, f"{path}:{line}: {problem}")
