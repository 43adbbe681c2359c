"""Publishing a render: out_dir is the complete new folder or the untouched old one, on real files."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from pipeline.publish import MARKER, PublishError, default_out_dir, publish


def artifacts(root: Path, files: dict[str, bytes]) -> dict[str, Path]:
    """Files standing in for artifact-store entries: name -> path under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {name: root / name for name in files}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def siblings(out_dir: Path) -> set[str]:
    """What lies beside out_dir: after any publish, only the folder and its lock file."""
    return set(os.listdir(out_dir.parent))


@pytest.fixture
def old_render(tmp_path) -> Path:
    """A folder published by an earlier render: an episode, a storyboard and the plan."""
    out_dir = tmp_path / "out" / "ep-draft-16x9"
    publish(artifacts(tmp_path / "store-old", {"episode.mp4": b"old video", "storyboard.png": b"old board"}),
            out_dir, {"plan.json": {"render": "old"}})
    return out_dir


def test_publish_swaps_in_the_complete_new_folder(tmp_path, old_render):
    new = artifacts(tmp_path / "store-new", {"episode.mp4": b"new video", "storyboard.png": b"new board",
                                             "subtitles.srt": b"1\n"})
    written = publish(new, old_render, {"plan.json": {"render": "new", "title": "雨の街"},
                                        "cost.json": {"yuan": 0.5}})

    assert written == {n: old_render / n for n in ("episode.mp4", "storyboard.png", "subtitles.srt", "plan.json",
                                                   "cost.json")}
    assert {n: p.read_bytes() for n, p in written.items() if n in new} == {n: p.read_bytes() for n, p in new.items()}
    plan_text = written["plan.json"].read_text(encoding="utf-8")
    assert plan_text == json.dumps({"render": "new", "title": "雨の街"}, indent=2, ensure_ascii=False)
    assert "雨の街" in plan_text  # ensure_ascii=False: readable, not \\u escapes
    assert set(os.listdir(old_render)) == set(written) | {MARKER}
    assert json.loads((old_render / MARKER).read_text())["files"] == sorted(written)
    assert siblings(old_render) == {"ep-draft-16x9", ".ep-draft-16x9.lock"}  # no temp or old folder left
    assert all(p.read_bytes() for p in new.values())  # the store's files are copied, not moved


def test_a_copy_failing_midway_leaves_the_old_folder_untouched(tmp_path, old_render):
    before = snapshot(old_render)
    store = tmp_path / "store-new"
    good = artifacts(store, {"storyboard.png": b"new board"})
    outputs = {"storyboard.png": good["storyboard.png"], "episode.mp4": store / "never-written.mp4",
               "subtitles.srt": good["storyboard.png"]}
    with pytest.raises(PublishError, match=r"episode\.mp4.*never-written\.mp4.*untouched"):
        publish(outputs, old_render, {"plan.json": {"render": "new"}})
    assert snapshot(old_render) == before
    assert siblings(old_render) == {"ep-draft-16x9", ".ep-draft-16x9.lock"}  # the partial copy is gone


def test_a_json_side_file_that_cannot_be_encoded_leaves_the_old_folder_untouched(tmp_path, old_render):
    before = snapshot(old_render)
    with pytest.raises(TypeError):
        publish(artifacts(tmp_path / "s", {"episode.mp4": b"new"}), old_render, {"cost.json": {"yuan": object()}})
    assert snapshot(old_render) == before
    assert siblings(old_render) == {"ep-draft-16x9", ".ep-draft-16x9.lock"}


def test_no_file_of_an_older_render_stays_beside_the_new_ones(tmp_path, old_render):
    assert (old_render / "episode.mp4").exists()
    # A render stopped after the storyboard publishes the contact sheet only.
    written = publish(artifacts(tmp_path / "store-new", {"storyboard.png": b"new board"}), old_render,
                      {"cost.json": {"status": "storyboard"}})
    assert set(os.listdir(old_render)) == {"storyboard.png", "cost.json", MARKER}
    assert not (old_render / "episode.mp4").exists() and not (old_render / "plan.json").exists()
    assert written["storyboard.png"].read_bytes() == b"new board"


def test_first_publish_creates_the_folder_and_its_parents(tmp_path):
    out_dir = tmp_path / "a" / "b" / "ep-draft-9x16"
    written = publish(artifacts(tmp_path / "s", {"episode.mp4": b"v"}), out_dir, {})
    assert written == {"episode.mp4": out_dir / "episode.mp4"} and written["episode.mp4"].read_bytes() == b"v"


def test_leftovers_of_a_crash_do_not_break_the_next_publish(tmp_path, old_render):
    parent = old_render.parent
    # A process killed while copying: a half-written attempt beside the folder.
    (parent / ".ep-draft-16x9.publish-0123456789ab").mkdir()
    (parent / ".ep-draft-16x9.publish-0123456789ab" / "episode.mp4").write_bytes(b"half")
    written = publish(artifacts(tmp_path / "s1", {"episode.mp4": b"second"}), old_render, {})
    assert written["episode.mp4"].read_bytes() == b"second"
    assert siblings(old_render) == {"ep-draft-16x9", ".ep-draft-16x9.lock"}

    # A process killed between the two renames: no out_dir, the previous folder at .old, the new
    # one complete at .publish-<hex>. The previous folder is what the next publish starts from.
    os.replace(old_render, parent / ".ep-draft-16x9.old")
    (parent / ".ep-draft-16x9.publish-fedcba987654").mkdir()
    (parent / ".ep-draft-16x9.publish-fedcba987654" / "episode.mp4").write_bytes(b"complete but not swapped")
    bad = {"episode.mp4": tmp_path / "missing.mp4"}
    with pytest.raises(PublishError):
        publish(bad, old_render, {})  # even a failing publish puts the previous folder back first
    assert snapshot(old_render)["episode.mp4"] == b"second"
    assert siblings(old_render) == {"ep-draft-16x9", ".ep-draft-16x9.lock"}
    written = publish(artifacts(tmp_path / "s2", {"episode.mp4": b"third"}), old_render, {})
    assert written["episode.mp4"].read_bytes() == b"third"
    assert siblings(old_render) == {"ep-draft-16x9", ".ep-draft-16x9.lock"}

    # A process killed after the swap, before the old copy was deleted: removed next time.
    (parent / ".ep-draft-16x9.old").mkdir()
    (parent / ".ep-draft-16x9.old" / "episode.mp4").write_bytes(b"stale")
    publish(artifacts(tmp_path / "s3", {"episode.mp4": b"fourth"}), old_render, {})
    assert snapshot(old_render)["episode.mp4"] == b"fourth"
    assert siblings(old_render) == {"ep-draft-16x9", ".ep-draft-16x9.lock"}


def test_another_folders_attempts_are_not_leftovers(tmp_path):
    parent = tmp_path / "out"
    other = parent / ".ep.publish-0123456789ab.publish-0123456789ab"  # an attempt of folder "ep.publish-0123…"
    other.mkdir(parents=True)
    publish(artifacts(tmp_path / "s", {"episode.mp4": b"v"}), parent / "ep", {})
    assert other.is_dir()


def test_a_folder_no_render_published_is_never_replaced(tmp_path):
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(PublishError, match=r"home.*no render published.*nothing was written"):
        publish(artifacts(tmp_path / "s", {"episode.mp4": b"v"}), mine, {"plan.json": {}})
    assert snapshot(mine) == {"notes.txt": b"keep me"}
    (tmp_path / "empty").mkdir()  # an empty folder (made by hand for --out) is fine
    assert publish(artifacts(tmp_path / "s", {"episode.mp4": b"v"}), tmp_path / "empty", {})
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(PublishError, match="not a folder"):
        publish({}, tmp_path / "a-file", {"plan.json": {}})
    assert (tmp_path / "a-file").read_text() == "x"


def test_names_must_be_plain_and_given_once(tmp_path):
    src = artifacts(tmp_path / "s", {"episode.mp4": b"v"})["episode.mp4"]
    for bad in ("../episode.mp4", "sub/episode.mp4", "", MARKER):
        with pytest.raises(ValueError, match="plain file name"):
            publish({bad: src}, tmp_path / "out", {})
    with pytest.raises(ValueError, match="both"):
        publish({"plan.json": src}, tmp_path / "out", {"plan.json": {}})
    with pytest.raises(ValueError, match="does not name a folder"):
        publish({"episode.mp4": src}, Path("."), {})
    assert not (tmp_path / "out").exists()


def test_concurrent_publishes_to_one_folder_leave_one_complete_set(tmp_path):
    out_dir = tmp_path / "out" / "ep"
    sets = [artifacts(tmp_path / f"s{i}", {"episode.mp4": f"video {i}".encode(),
                                           "storyboard.png": f"board {i}".encode()})
            for i in range(6)]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            publish(sets[i], out_dir, {"plan.json": {"render": i}})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(sets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    i = json.loads((out_dir / "plan.json").read_text())["render"]
    assert snapshot(out_dir)["episode.mp4"] == f"video {i}".encode()
    assert snapshot(out_dir)["storyboard.png"] == f"board {i}".encode()
    assert siblings(out_dir) == {"ep", ".ep.lock"}


def test_default_out_dir_names_script_profile_and_aspect():
    wide = default_out_dir(Path("examples/episode_en.fountain"), "draft", "16:9")
    tall = default_out_dir(Path("examples/episode_en.fountain"), "draft", "9:16")
    assert wide == Path("out/episode_en-draft-16x9") and tall == Path("out/episode_en-draft-9x16")
    assert wide != tall
    assert default_out_dir(Path("examples/episode_en.fountain"), "standard", "16:9") != wide
    toml = default_out_dir(Path("ep.fountain"), "examples/profiles/standard_gpu.toml", "9:16", root=Path("/r"))
    assert toml == Path("/r/ep-standard_gpu-9x16")
    # one safe path component whatever the script is called; CJK letters are kept
    odd = default_out_dir(Path("scripts/第1集: 雨 *final*?.fountain"), "draft", "16:9")
    assert odd.parent == Path("out") and odd.name == "第1集_雨_final_-draft-16x9"
    assert default_out_dir(Path("../.hidden.yaml"), "draft", "16:9").name == "hidden-draft-16x9"
    with pytest.raises(ValueError, match="profile"):
        default_out_dir(Path("ep.fountain"), "...", "16:9")
