"""Bad environments, paths and values through the real CLI (#11 item 5): each is one line on
stderr starting with ``error:`` that names the value or the path, exit 2 (or 1 for a failure
while publishing), no traceback; nothing is created that the user did not ask for; every JSON
file a render writes is strict JSON.

Tests run as root, so a chmod'ed folder is still writable. The read-only locations used here
are real ones: ``/sys`` (``mkdir`` there: EPERM), ``/proc/self`` (no new file can be created
there), ``/dev/null`` (a device), and a path under a regular file (``a-file/sub``: ENOTDIR). A
full filesystem cannot be made here (no tmpfs, no loop mount): ``publish`` is run in a child
process whose file-size limit (``RLIMIT_FSIZE``) makes its copy fail with EFBIG, the same
OSError path an ENOSPC takes; ``check_out_dir``'s "filesystem is full" refusal is not
exercised.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import REPO, SHARED_DATA

SHOTLIST = REPO / "examples" / "shotlist.yaml"
RIFE = REPO / "examples" / "profiles" / "draft_rife.toml"


@pytest.fixture
def home(tmp_path) -> dict[str, Path]:
    """An isolated user: home, XDG folders, an empty config file, a working folder, a plain file."""
    places = {name: tmp_path / name for name in ("home", "cache", "data", "work")}
    for folder in places.values():
        folder.mkdir()
    places["config"] = tmp_path / "config.toml"
    places["config"].write_text("", encoding="utf-8")
    places["file"] = tmp_path / "a-file"
    places["file"].write_text("not a folder", encoding="utf-8")
    return places


def anim(home: dict[str, Path], *args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` in the isolated working folder, with ``env`` on top."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ANIM_", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    base.update(HOME=str(home["home"]), XDG_CACHE_HOME=str(home["cache"]), XDG_DATA_HOME=str(home["data"]),
                XDG_CONFIG_HOME=str(home["home"] / ".config"), ANIM_CONFIG=str(home["config"]),
                MLFLOW_TRACKING_URI=f"sqlite:///{home['work'] / 'mlflow.db'}", PYTHONPATH=str(REPO),
                COLUMNS="400")
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=home["work"], env=base | env,
                          capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess, code: int = 2, *, before_ray: bool = True) -> str:
    """The one ``error:`` line of a failed command (Ray's WARNING lines aside); no traceback.

    ``before_ray``: stderr holds that line and nothing else (Ray never started: it prints a
    WARNING line as it starts)."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    if not before_ray:
        lines = [ln for ln in lines if "WARNING" not in ln]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def default_store(home) -> Path:
    return home["cache"] / "anim-pipeline" / "store"


def created(home) -> set[str]:
    """What appeared in the working folder, the cache and the data folder (MLflow's db aside)."""
    return {p.name for k in ("work", "cache", "data") for p in home[k].iterdir()} - {"mlflow.db"}


# --------------------------------------------------------------------------- environment values


@pytest.mark.parametrize("value", ["0", "-7", "nan", "inf", "-inf", "1e999"])
def test_a_bad_fx_rate_in_the_environment_is_one_line(home, value):
    line = error_line(anim(home, "plan", str(SHOTLIST), ANIM_USD_CNY=value))
    assert "ANIM_USD_CNY" in line and f"'{value}'" in line and "usd_cny" in line
    assert not default_store(home).exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-1.0"])
def test_a_bad_fx_rate_in_a_config_file_names_the_file(home, value):
    home["config"].write_text(f"usd_cny = {value}\n", encoding="utf-8")
    line = error_line(anim(home, "plan", str(SHOTLIST)))
    assert str(home["config"]) in line and "usd_cny" in line
    assert ("finite" if value != "-1.0" else "greater than 0") in line


def test_an_infinite_fx_rate_stops_a_render_before_anything_is_written(home):
    """It used to render and write ``"total_yuan": Infinity`` into cost.json."""
    out = home["work"] / "out-inf"
    line = error_line(anim(home, "render", str(SHOTLIST), "--no-progress", "--out", str(out), ANIM_USD_CNY="inf"))
    assert "ANIM_USD_CNY" in line and "finite" in line
    assert not out.exists() and not default_store(home).exists()


def with_value(table: Path, into: Path, row: int, column: str, value: str) -> Path:
    """A copy of a CSV table with one cell changed (``row`` 0 is the first row after the header)."""
    with table.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rows[row][column] = value
    with into.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return into


def test_a_price_catalog_with_a_non_finite_or_malformed_row_names_file_and_line(home, tmp_path):
    bad = with_value(REPO / "cluster" / "prices.csv", tmp_path / "prices.csv", 0, "price", "nan")
    line = error_line(anim(home, "plan", str(SHOTLIST), ANIM_PRICES=str(bad)))
    assert f"{bad}:2: price" in line and "finite" in line
    shipped = (REPO / "cluster" / "prices.csv").read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join([shipped[0], shipped[1] + ",extra", *shipped[2:]]) + "\n", encoding="utf-8")
    assert f"{bad}:2: more fields than the header" in error_line(anim(home, "plan", str(SHOTLIST),
                                                                         ANIM_PRICES=str(bad)))
    line = error_line(anim(home, "plan", str(SHOTLIST), ANIM_PRICES=str(tmp_path)))
    assert f"{tmp_path}: cannot read the price catalog" in line
    line = error_line(anim(home, "plan", str(SHOTLIST), ANIM_PRICES="/dev/null"))
    assert "/dev/null: the price catalog has no rows" in line


def test_a_calibration_row_with_an_infinite_time_names_file_and_line(home, tmp_path):
    bad = with_value(REPO / "cluster" / "calibration.csv", tmp_path / "calibration.csv", 2, "overhead_s", "inf")
    line = error_line(anim(home, "plan", str(SHOTLIST), ANIM_CALIBRATION=str(bad)))
    assert f"{bad}:4: overhead_s" in line and "finite" in line


@pytest.mark.parametrize("args, names", [
    (["--set", "short_side=nan"], "short_side: nan is not a finite number (from the overrides)"),
    (["--set", "diffusers.guidance_scale=inf", "--profile", str(REPO / "examples" / "profiles" / "standard_gpu.toml")],
     "diffusers.guidance_scale: inf is not a finite number"),
    (["--budget", "nan"], "--budget 'nan': expected a finite amount"),
    (["--budget", "inf"], "--budget 'inf': expected a finite amount"),
])
def test_non_finite_profile_values_and_budgets_are_refused(home, args, names):
    assert names in error_line(anim(home, "plan", str(SHOTLIST), *args))


def test_a_home_folder_of_nobody_is_one_line_naming_where_it_was_set(home, tmp_path):
    """``~nosuchuser/…`` cannot be expanded (Python raises RuntimeError): each place says so."""
    says = "cannot expand '~nosuchuser' (no such user or no home folder)"
    line = error_line(anim(home, "plan", str(SHOTLIST), ANIM_STORE="~nosuchuser/store"))
    assert line == f"error: environment variable ANIM_STORE: setting store: '~nosuchuser/store': {says}"
    home["config"].write_text('prices = "~nosuchuser/prices.csv"\n', encoding="utf-8")
    assert f"{home['config']}: setting prices: '~nosuchuser/prices.csv': {says}" in error_line(
        anim(home, "plan", str(SHOTLIST)))
    assert f"config file given by ANIM_CONFIG: '~nosuchuser/c.toml': {says}" in error_line(
        anim(home, "plan", str(SHOTLIST), ANIM_CONFIG="~nosuchuser/c.toml"))
    home["config"].write_text("", encoding="utf-8")
    line = error_line(anim(home, "plan", str(SHOTLIST), "--profile", str(RIFE),
                           "--set", "rife.weights=~nosuchuser/w.pkl"))
    assert f"[rife] weights = '~nosuchuser/w.pkl': {says}" in line


# --------------------------------------------------------------------------- the artifact store


def store_cases(home) -> list[tuple[str, str]]:
    """(ANIM_STORE, what the line says) for every location a store cannot be opened at."""
    f = home["file"]
    return [(str(f), f"artifact store {f}: not a folder (a file)"),
            ("/dev/null", "artifact store /dev/null: not a folder (a device)"),
            (str(f / "sub"), f"artifact store {f / 'sub'}: {f} is a file, not a folder"),
            ("/sys/anim-store", "artifact store /sys/anim-store: cannot create it (Operation not permitted)"),
            ("/proc/self/anim-store", "/anim-store: cannot create it"),
            (str(home["work"] / "typo" / "deeper" / "store"), f"the folder that would hold it, "
             f"{home['work'] / 'typo' / 'deeper'}, does not exist")]


@pytest.mark.parametrize("case", range(6), ids=["file", "dev-null", "under-a-file", "sys", "proc", "missing-parent"])
def test_a_store_that_cannot_be_opened_is_one_line_and_creates_nothing(home, case):
    location, says = store_cases(home)[case]
    line = error_line(anim(home, "plan", str(SHOTLIST), ANIM_STORE=location))
    assert says in line, line
    assert home["file"].read_text(encoding="utf-8") == "not a folder"
    assert not (home["work"] / "typo").exists() and not Path("/sys/anim-store").exists()
    assert created(home) == set()


def test_render_refuses_a_bad_store_before_ray_starts_and_publishes_nothing(home):
    out = home["work"] / "episode-out"
    for location, says in (store_cases(home)[0], store_cases(home)[-1]):
        line = error_line(anim(home, "render", str(SHOTLIST), "--no-progress", "--out", str(out),
                               ANIM_STORE=location))
        assert says in line
    assert created(home) == set()


def test_the_default_store_is_created_on_first_use_and_a_named_one_in_an_existing_folder(home):
    assert anim(home, "plan", str(SHOTLIST)).returncode == 0
    assert (default_store(home) / ".staging").is_dir()  # parents and all: nobody typed this path
    named = home["work"] / "my-store"
    assert anim(home, "plan", str(SHOTLIST), ANIM_STORE=str(named)).returncode == 0
    assert named.is_dir()


# --------------------------------------------------------------------------- the output folder


def out_cases(home) -> list[tuple[str, str]]:
    f, foreign = home["file"], home["work"] / "my-notes"
    return [(str(f), f"{f} is not a folder (a file)"),
            ("/dev/null", "/dev/null is not a folder (a device or a special file)"),
            (str(f / "ep"), f"{f / 'ep'}: {f} is a file, not a folder"),
            ("/sys/anim-out", "/sys/anim-out: cannot create files in /sys"),
            ("/proc/self/anim-out", "cannot create files in /proc/"),
            (str(home["work"] / "typo" / "ep"), f"its folder {home['work'] / 'typo'} does not exist"),
            (str(foreign), f"{foreign} holds files that no render published"),
            (".", ".: does not name a folder")]


@pytest.mark.parametrize("case", range(8), ids=["file", "dev-null", "under-a-file", "sys", "proc", "missing-parent",
                                                "foreign-folder", "dot"])
def test_an_out_folder_that_cannot_be_published_is_refused_before_any_work(home, case):
    foreign = home["work"] / "my-notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    target, says = out_cases(home)[case]
    line = error_line(anim(home, "render", str(SHOTLIST), "--no-progress", "--out", target))
    assert says in line, line
    assert created(home) == {"my-notes"}  # no store, no out/, no lock file
    assert (foreign / "notes.txt").read_text(encoding="utf-8") == "mine" and len(list(foreign.iterdir())) == 1
    assert home["file"].read_text(encoding="utf-8") == "not a folder"


def test_a_failing_write_while_publishing_leaves_the_previous_folder_and_no_partial_one(tmp_path):
    """A filesystem that refuses a write midway (here: a file-size limit, EFBIG, in a child
    process; ENOSPC takes the same path) is one PublishError; the old render stays as it was."""
    from pipeline.publish import publish

    src = tmp_path / "store"
    src.mkdir()
    (src / "small.mp4").write_bytes(b"v" * 100)
    (src / "big.mp4").write_bytes(b"v" * 300_000)
    out = tmp_path / "out" / "ep"
    publish({"episode.mp4": src / "small.mp4"}, out, {"plan.json": {"render": "old"}})
    child = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        from pipeline.publish import PublishError, publish
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            publish({{"episode.mp4": Path({str(src / 'big.mp4')!r})}}, Path({str(out)!r}), {{"plan.json": {{}}}})
        except PublishError as exc:
            print(exc)
            sys.exit(7)
    """)
    result = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 7, result.stderr
    assert "copying episode.mp4" in result.stdout and "File too large" in result.stdout
    assert "previous output folder is untouched" in result.stdout
    assert (out / "episode.mp4").read_bytes() == b"v" * 100
    assert json.loads((out / "plan.json").read_text(encoding="utf-8")) == {"render": "old"}
    assert sorted(p.name for p in out.parent.iterdir()) == [".ep.lock", "ep"]


def test_a_non_finite_value_in_a_side_file_is_refused_before_anything_is_written(tmp_path):
    from pipeline.publish import PublishError, publish

    (tmp_path / "v.mp4").write_bytes(b"v")
    out = tmp_path / "out" / "ep"
    with pytest.raises(PublishError, match=r"cost\.json: records\[1\]\.yuan is inf, which JSON cannot hold"):
        publish({"episode.mp4": tmp_path / "v.mp4"}, out, {"cost.json": {"records": [{"yuan": 1.0},
                                                                                     {"yuan": float("inf")}]}})
    assert not (tmp_path / "out").exists()


def test_write_profile_into_an_unwritable_place_is_one_line(home):
    line = error_line(anim(home, "plan", str(SHOTLIST), "--budget", "1", "--write-profile", "/proc/self/p.toml"))
    assert "--write-profile /proc/self/p.toml: cannot write it" in line


# --------------------------------------------------------------------------- backend files


@pytest.mark.parametrize("command", ["plan", "render"])
def test_missing_rife_weights_are_refused_before_any_work_naming_the_path(home, command):
    missing = home["work"] / "no-such" / "flownet.pkl"
    extra = ["--no-progress"] if command == "render" else []
    line = error_line(anim(home, command, str(SHOTLIST), "--profile", str(RIFE), "--set", f"rife.weights={missing}",
                           *extra))
    assert f"profile {RIFE}: [rife] weights = '{missing}': no such file" in line
    assert created(home) == set()  # no store, no output folder


def test_rife_weights_that_are_a_folder_or_relative_and_absent_are_refused(home):
    line = error_line(anim(home, "plan", str(SHOTLIST), "--profile", str(RIFE),
                           "--set", f"rife.weights={home['work']}"))
    assert f"weights = '{home['work']}': not a file" in line
    # The shipped profile's weights are relative to where anim runs: from elsewhere they are absent.
    line = error_line(anim(home, "plan", str(SHOTLIST), "--profile", str(RIFE)))
    assert "no such file (relative to the current folder" in line and str(home["work"]) in line


@pytest.mark.skipif(not (SHARED_DATA / "weights" / "rife" / "flownet.pkl").is_file(), reason="no RIFE weights")
def test_present_rife_weights_pass_the_check(home):
    weights = SHARED_DATA / "weights" / "rife" / "flownet.pkl"
    result = anim(home, "plan", str(SHOTLIST), "--profile", str(RIFE), "--set", f"rife.weights={weights}")
    assert result.returncode == 0, result.stderr
    assert "inbetween on cpu" in result.stdout


# --------------------------------------------------------------------------- rich markup in names


MARKUP_SHOTLIST = """\
title: "Night [/x] of [bold]Lanterns[/bold]"
characters: ["MEI[/x]", "[red]KAI"]
scenes:
  - heading: EXT. RIVERBANK [/x] - DUSK
    location: RIVERBANK [/x]
    time_of_day: DUSK
    shots:
      - duration: 1.0
        camera: medium
        characters: ["MEI[/x]"]
        action: "Mei [/x] kneels [bold]at[/bold] the water."
        dialogue:
          - character: "MEI[/x]"
            text: "Hi [/x] there."
      - duration: 1.0
        camera: wide
        characters: ["[red]KAI"]
        action: Kai waves.
"""


def test_a_script_error_in_a_markup_named_folder_names_the_right_file(home, tmp_path):
    folder = tmp_path / "m[bold]b[/bold]"  # the "/" makes it two folders: m[bold]b[ and bold]
    folder.mkdir(parents=True)
    script = folder / "ep.yaml"
    script.write_text("title: x\nscenes: 3\n", encoding="utf-8")
    line = error_line(anim(home, "plan", str(script)))
    assert line.startswith(f"error: {script}"), line


def test_plan_prints_markup_in_titles_names_and_paths_literally(home, tmp_path):
    folder = tmp_path / "m[" / "x]"  # a path holding "[/x]"
    folder.mkdir(parents=True)
    script = folder / "ep.yaml"
    script.write_text(MARKUP_SHOTLIST, encoding="utf-8")
    store = folder / "store[" / "x]"  # in an existing folder, as a store the user names must be
    store.parent.mkdir()
    result = anim(home, "plan", str(script), ANIM_STORE=str(store))
    assert result.returncode == 0, result.stderr
    assert "Night [/x] of [bold]Lanterns[/bold]" in result.stdout and f"store {store})" in result.stdout
    as_json = anim(home, "plan", str(script), "--json", ANIM_STORE=str(store))
    assert json.loads(as_json.stdout, parse_constant=_no_constant)["title"] == "Night [/x] of [bold]Lanterns[/bold]"


def _no_constant(name: str):
    raise AssertionError(f"{name} is not JSON")


def test_a_render_with_markup_everywhere_prints_it_literally_and_writes_strict_json(home, tmp_path):
    """Title, character names, script folder, store and output folder all hold rich markup."""
    folder = tmp_path / "m[" / "x]"  # a path holding "[/x]"
    folder.mkdir(parents=True)
    script = folder / "ep.yaml"
    script.write_text(MARKUP_SHOTLIST, encoding="utf-8")
    out = folder / "out[bold]"
    (folder / "store[").mkdir()
    result = anim(home, "render", str(script), "--out", str(out), ANIM_STORE=str(folder / "store[" / "x]"))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"episode: {out / 'episode.mp4'}" in result.stdout
    assert "cost of Night [/x] of [bold]Lanterns[/bold]" in result.stdout
    assert "rendering Night [/x] of [bold]Lanterns[/bold]" in result.stderr  # the progress bar
    written = sorted(p.name for p in out.glob("*.json"))
    assert {"cost.json", "plan.json", "config.json"} <= set(written)
    for name in written:
        json.loads((out / name).read_text(encoding="utf-8"), parse_constant=_no_constant)
    cost = json.loads((out / "cost.json").read_text(encoding="utf-8"))
    assert cost["total_yuan"] > 0 and cost["status"] == "complete"
    # the render's wall includes its voice phase and excludes the Ray start (it once went negative when
    # the voices started the cluster and their start was taken off a wall that did not include it)
    assert 0 < cost["wall_seconds"] and cost["ray_init_seconds"] > 0
