"""Settings resolved once (defaults < config files < environment < CLI), the shipped tables found
as package data from anywhere, layered calibration, ``--set`` profile overrides, and no
import-time side effects. Every test builds its own HOME / XDG directories: none reads the
real ~/.config or /etc."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.calibration import Calibration, CalibrationRow
from pipeline.config import (Settings, SettingsError, override_settings, parse_overrides, merge, resolve_profile,
                             resolve_settings, shipped_table)
from stages.records import ProfileError

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CAL = REPO / "cluster" / "calibration.csv"


@pytest.fixture
def home(tmp_path) -> dict[str, str]:
    """An environment of its own: HOME and the XDG directories under tmp_path, nothing else."""
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    return env


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _user_config(env: dict[str, str]) -> Path:
    return Path(env["XDG_CONFIG_HOME"]) / "anim-pipeline" / "config.toml"


def _cli_env(env: dict[str, str], **extra: str) -> dict[str, str | None]:
    """For CliRunner, which adds to os.environ: also unset every variable a setting reads."""
    unset = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "ANIM_STORE", "ANIM_PRICES", "ANIM_CALIBRATION", "ANIM_USD_CNY",
             "ANIM_PRICE_TIER", "ANIM_PRICE_PROVIDER", "ANIM_CONFIG", "ANIM_DEBUG")
    return {k: None for k in unset} | env | extra


# --------------------------------------------------------------------------- order of sources


def test_each_source_overrides_the_one_before(tmp_path, home):
    studio = tmp_path / "etc" / "config.toml"
    resolve = lambda env=home, **cli: resolve_settings(env, studio_file=studio, **cli)  # noqa: E731

    # 1. Built-in defaults: the per-user XDG directories and the shipped tables.
    s = resolve()
    assert s.usd_cny == 7.10 and s.price_tier == "on-demand"
    assert s.store == str(tmp_path / "cache" / "anim-pipeline" / "store")
    assert s.user_calibration == str(tmp_path / "data" / "anim-pipeline" / "calibration.csv")
    assert set(s.sources.values()) == {"default"} and s.config_files == []
    # 2. The studio file.
    _write(studio, 'usd_cny = 7.0\nprice_tier = "spot"\nstore = "/studio/store"\n')
    s = resolve()
    assert (s.usd_cny, s.price_tier, s.store) == (7.0, "spot", "/studio/store")
    assert s.sources["usd_cny"] == str(studio) and s.config_files == [str(studio)]
    # 3. The user file, over the studio file key by key.
    user = _write(_user_config(home), "usd_cny = 7.2\n")
    s = resolve()
    assert (s.usd_cny, s.price_tier, s.store) == (7.2, "spot", "/studio/store")
    assert s.sources["usd_cny"] == str(user) and s.sources["price_tier"] == str(studio)
    assert s.config_files == [str(studio), str(user)]
    # 4. The environment.
    env = home | {"ANIM_USD_CNY": "7.3", "ANIM_STORE": "s3://bucket/store", "ANIM_PRICE_TIER": ""}
    s = resolve(env)
    assert (s.usd_cny, s.store, s.price_tier) == (7.3, "s3://bucket/store", "spot")  # empty = unset
    assert s.sources["usd_cny"] == "$ANIM_USD_CNY"
    # 5. The command line.
    s = resolve(env, usd_cny=7.4, store=None)
    assert (s.usd_cny, s.store) == (7.4, "s3://bucket/store")
    assert s.sources["usd_cny"] == "command line"


def test_every_documented_variable_is_read(home):
    env = home | {"RAY_ADDRESS": "ray://head:10001", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
                  "ANIM_PRICES": "/t/prices.csv", "ANIM_CALIBRATION": "/t/cal.csv",
                  "ANIM_PRICE_PROVIDER": "aws"}
    s = resolve_settings(env, studio_file=Path("/nonexistent"))
    assert (s.ray_address, s.tracking_uri, s.prices, s.calibration, s.price_provider) == (
        "ray://head:10001", "http://mlflow:5000", "/t/prices.csv", "/t/cal.csv", "aws")
    assert s.calibration_paths == ("/t/cal.csv", s.user_calibration)


def test_a_command_option_goes_through_the_same_override(home):
    """``plan --spot`` applies to the settings the callback resolved, without resolving again."""
    base = resolve_settings(home, studio_file=Path("/nonexistent"))
    spot = override_settings(base, price_tier="spot")
    assert spot.price_tier == "spot" and spot.sources["price_tier"] == "command line"
    assert override_settings(base, price_tier=None) is base
    with pytest.raises(SettingsError, match="unknown setting 'tier'"):
        override_settings(base, tier="spot")
    with pytest.raises(SettingsError, match="command line: setting num_cpus"):
        override_settings(base, num_cpus=0)


def test_debug_from_the_flag_or_the_environment(home):
    nowhere = Path("/nonexistent")
    assert resolve_settings(home, studio_file=nowhere).debug is False
    assert resolve_settings(home | {"ANIM_DEBUG": "1"}, studio_file=nowhere).debug is True
    assert resolve_settings(home, studio_file=nowhere, debug=True).debug is True
    with pytest.raises(SettingsError, match="ANIM_DEBUG"):
        resolve_settings(home | {"ANIM_DEBUG": "maybe"}, studio_file=nowhere)


def test_settings_dump_round_trips_for_config_json(home):
    s = resolve_settings(home, studio_file=Path("/nonexistent"), num_cpus=2)
    dumped = json.loads(json.dumps(s.model_dump()))
    assert Settings(**dumped) == s and dumped["sources"]["num_cpus"] == "command line"


# --------------------------------------------------------------------------- config files


def test_config_replaces_the_search(tmp_path, home):
    studio = _write(tmp_path / "etc" / "config.toml", 'price_tier = "spot"\nusd_cny = 7.0\n')
    _write(_user_config(home), "usd_cny = 7.2\n")
    given = _write(tmp_path / "only.toml", "usd_cny = 6.9\n")
    for s in (resolve_settings(home, studio_file=studio, config=given),
              resolve_settings(home | {"ANIM_CONFIG": str(given)}, studio_file=studio)):
        assert (s.usd_cny, s.price_tier) == (6.9, "on-demand")  # neither studio nor user file read
        assert s.config_files == [str(given)]
    with pytest.raises(SettingsError, match=r"missing\.toml: config file not found \(given by --config\)"):
        resolve_settings(home, studio_file=studio, config=tmp_path / "missing.toml")


def test_relative_paths_in_a_config_file_are_relative_to_it(tmp_path, home):
    given = _write(tmp_path / "cfg" / "config.toml", 'store = "store"\nprices = "../prices.csv"\n'
                                                     'user_calibration = "~/cal.csv"\nray_address = "auto"\n')
    s = resolve_settings(home, config=given)
    assert s.store == str(tmp_path / "cfg" / "store")
    assert Path(s.prices) == tmp_path / "cfg" / ".." / "prices.csv"
    assert s.user_calibration == str(Path("~/cal.csv").expanduser())
    assert s.ray_address == "auto"


@pytest.mark.parametrize("text, message", [
    ('stor = "/x"\n', r"bad\.toml: unknown setting 'stor'; a config file sets only: ray_address"),
    ('usd_cny = "seven"\n', r"bad\.toml: setting usd_cny: Input should be a valid number"),
    ("num_cpus = 0\n", r"bad\.toml: setting num_cpus: Input should be greater than or equal to 1"),
    ("[settings]\nstore = 1\n", r"bad\.toml: unknown setting 'settings'"),
    ("usd_cny = = 7\n", r"bad\.toml: not a valid TOML config file"),
])
def test_a_bad_config_file_names_the_file_and_the_key(tmp_path, home, text, message):
    bad = _write(tmp_path / "bad.toml", text)
    with pytest.raises(SettingsError, match=message):
        resolve_settings(home, config=bad)
    # Found by the search, not given: the same message.
    _write(_user_config(home), text)
    with pytest.raises(SettingsError, match=message.replace(r"bad\.toml", r"anim-pipeline/config\.toml")):
        resolve_settings(home, studio_file=Path("/nonexistent"))


def test_a_bad_environment_value_names_the_variable(home):
    with pytest.raises(SettingsError, match=r"environment variable ANIM_USD_CNY: setting usd_cny: .*'abc'"):
        resolve_settings(home | {"ANIM_USD_CNY": "abc"}, studio_file=Path("/nonexistent"))


# --------------------------------------------------------------------------- the CLI


def test_the_cli_resolves_once_and_commands_read_it(tmp_path, home):
    from pipeline.cli import app

    runner = CliRunner()
    given = _write(tmp_path / "cli.toml", f'store = "{tmp_path / "from-config"}"\n')
    result = runner.invoke(app, ["--config", str(given), "cache", "stats", "--json"], env=_cli_env(home))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["location"].endswith("from-config")
    # A command's own option is a CLI-level override of the same settings.
    result = runner.invoke(app, ["--config", str(given), "cache", "stats", "--json",
                                 "--store", str(tmp_path / "from-option")], env=_cli_env(home))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["location"].endswith("from-option")
    # A bad config file stops every command with one line naming it.
    bad = _write(tmp_path / "bad.toml", "usd_cny = false\n")
    result = runner.invoke(app, ["--config", str(bad), "cache", "stats"], env=_cli_env(home))
    assert result.exit_code == 2
    assert f"{bad}: setting usd_cny" in result.stderr and "Traceback" not in result.output


# --------------------------------------------------------------------------- package data


def test_shipped_tables_do_not_depend_on_the_current_directory(tmp_path, home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = resolve_settings(home, studio_file=Path("/nonexistent"))
    assert Path(s.prices).read_bytes() == (REPO / "cluster" / "prices.csv").read_bytes()
    assert Path(s.calibration).read_bytes() == SHIPPED_CAL.read_bytes()
    assert Path(s.prices) == shipped_table("prices.csv") and Path(s.prices).is_absolute()


def test_an_installed_package_finds_its_tables_from_another_directory(tmp_path):
    """A non-editable install (``pip install --target``) of a copy of the source tree, used from
    an unrelated directory: the defaults point at the package's own copies of the tables."""
    src, target, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    for name in ("pipeline", "stages", "cluster"):  # pipeline/cluster stays a link to ../cluster
        shutil.copytree(REPO / name, src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-compile", "--target", str(target), str(src)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    assert not (target / "pipeline" / "cluster").is_symlink()  # real files in the installed package
    shutil.rmtree(src)  # nothing may point back into the source tree
    elsewhere.mkdir()
    probe = ("import json, pipeline; from pathlib import Path; from pipeline.config import resolve_settings; "
             "s = resolve_settings({'HOME': '/nonexistent'}, studio_file=Path('/nonexistent')); "
             "print(json.dumps({'pkg': pipeline.__file__, 'prices': s.prices, 'calibration': s.calibration}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIM_")} | {"PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    found = json.loads(out)
    assert Path(found["pkg"]).is_relative_to(target)
    assert Path(found["prices"]) == target / "pipeline" / "cluster" / "prices.csv"
    assert Path(found["prices"]).read_bytes() == (REPO / "cluster" / "prices.csv").read_bytes()
    assert Path(found["calibration"]).read_bytes() == SHIPPED_CAL.read_bytes()


# --------------------------------------------------------------------------- calibration layers


def _row(shipped: CalibrationRow, seconds: float) -> CalibrationRow:
    return shipped.model_copy(update={"seconds_per_unit_mpx": seconds, "source": "measured here: test"})


def test_user_rows_win_over_shipped_rows(tmp_path):
    shipped = Calibration.load(SHIPPED_CAL)
    first = shipped.rows[0]
    user = tmp_path / "data" / "calibration.csv"
    Calibration.load(user).write([_row(first, 123.0)])
    layered = Calibration.load(SHIPPED_CAL, user)
    assert layered.row(first.stage, first.backend, first.device).seconds_per_unit_mpx == 123.0
    assert len(layered.rows) == len(shipped.rows)  # the other shipped rows are still there
    other = shipped.rows[1]
    assert layered.row(other.stage, other.backend, other.device) == other
    assert layered.path == str(user)
    # A missing user table adds nothing; the error names every table searched.
    missing = tmp_path / "none.csv"
    assert Calibration.load(SHIPPED_CAL, missing).rows == shipped.rows
    with pytest.raises(ProfileError) as exc:
        Calibration.load(SHIPPED_CAL, missing).row("keyframes", "nope", "cpu")
    assert str(SHIPPED_CAL) in str(exc.value) and f"{missing} (absent)" in str(exc.value)


def test_writing_the_user_table_keeps_its_rows_and_copies_no_shipped_row(tmp_path):
    shipped_bytes = SHIPPED_CAL.read_bytes()
    rows = Calibration.load(SHIPPED_CAL).rows
    user = tmp_path / "new" / "dir" / "calibration.csv"
    Calibration.load(SHIPPED_CAL, user).write([_row(rows[0], 1.0)])
    Calibration.load(SHIPPED_CAL, user).write([_row(rows[1], 2.0)])
    assert sorted(r.seconds_per_unit_mpx for r in Calibration.load(user).rows) == [1.0, 2.0]
    assert SHIPPED_CAL.read_bytes() == shipped_bytes
    assert [p.name for p in user.parent.iterdir()] == ["calibration.csv"]  # no temp file left


def test_anim_calibrate_writes_the_user_table_and_not_the_shipped_one(tmp_path, home):
    from pipeline import tracking
    from pipeline.cli import app
    from pipeline.cost import PriceCatalog
    from pipeline.models import Ledger, LedgerRecord
    from pipeline.plan import make_plan
    from stages.script import load_episode

    shipped_bytes = SHIPPED_CAL.read_bytes()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = home | {"MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    empty = _write(tmp_path / "empty.toml", "")  # so no /etc/anim-pipeline/config.toml is read
    settings = resolve_settings(env, config=empty)
    # 1. One complete render recorded in MLflow: its plan and a ledger of executed nodes.
    plan = make_plan(load_episode(REPO / "examples" / "episode_en.fountain"), resolve_profile("draft"),
                     calibration=Calibration.load(*settings.calibration_paths),
                     prices=PriceCatalog.load(settings.prices, usd_cny=settings.usd_cny), script_sha256="0" * 64)
    records = [LedgerRecord(stage=stage, shot=s.shot.id, seconds=0.25, resource="cpu", units=1, yuan=0.0)
               for s in plan.shots for stage in ("storyboard", "keyframes", "inbetween", "encode")]
    ledger = Ledger(records=records)
    tracking.log_render(tracking_uri=uri, plan=plan, ledger=ledger, metrics={"cost_yuan": 0.0}, artifacts={},
                        tags={"status": "complete"}, series="calibration test", plan_json=True)
    # 2. ``anim calibrate`` fits rows from it into the user table.
    result = CliRunner().invoke(app, ["--config", str(empty), "calibrate", "--runs", "1"], env=_cli_env(env))
    assert result.exit_code == 0, result.output
    user = Path(settings.user_calibration)
    assert user.is_file() and f"rows to {user} (over the shipped" in result.stdout
    written = Calibration.load(user).rows
    assert written and all(r.source.startswith("measured here: anim calibrate") for r in written)
    assert SHIPPED_CAL.read_bytes() == shipped_bytes
    # 3. The next plan prices from them.
    layered = Calibration.load(*settings.calibration_paths)
    assert all(layered.row(r.stage, r.backend, r.device) == r for r in written)


def test_anim_calibrate_refuses_to_write_the_shipped_table(tmp_path, home):
    from pipeline.cli import app

    given = _write(tmp_path / "c.toml", f'user_calibration = "{SHIPPED_CAL}"\n'
                                        f'tracking_uri = "sqlite:///{tmp_path / "mlflow.db"}"\n')
    result = CliRunner().invoke(app, ["--config", str(given), "calibrate"], env=_cli_env(home))
    assert result.exit_code == 2 and "shipped table" in result.stderr


# --------------------------------------------------------------------------- --set overrides


@pytest.mark.parametrize("items, expected", [
    (["fps=12"], {"fps": 12}),
    (["strength=0.5", "audit=true", "hold_static=false"], {"strength": 0.5, "audit": True, "hold_static": False}),
    (["flow.preset=fast"], {"flow": {"preset": "fast"}}),
    (['flow.preset="fast"', "diffusers.steps=8", "diffusers.model=/m/sd"],
     {"flow": {"preset": "fast"}, "diffusers": {"steps": 8, "model": "/m/sd"}}),
    (["sizes=[1, 2]", "name=my draft", 'title="a = b"'], {"sizes": [1, 2], "name": "my draft", "title": "a = b"}),
    (["fps=12", "fps=24"], {"fps": 24}),  # the last one wins
    (["x264_preset=veryfast", "crf=23 # a comment"], {"x264_preset": "veryfast", "crf": 23}),
    (["note=1\nfps = 2"], {"note": "1\nfps = 2"}),  # one item sets one field
    (["a.b.c=1", "a.b.d=2"], {"a": {"b": {"c": 1, "d": 2}}}),
    ([], {}),
])
def test_parse_overrides(items, expected):
    assert parse_overrides(items) == expected


@pytest.mark.parametrize("item, message", [
    ("fps", r"--set 'fps': expected FIELD=VALUE"),
    ("=12", r"--set '=12': expected FIELD=VALUE"),
    ("flow..preset=fast", r"--set 'flow..preset=fast': expected FIELD=VALUE"),
    ("fl ow=1", r"--set 'fl ow=1': expected FIELD=VALUE"),
])
def test_parse_overrides_rejects_a_malformed_item(item, message):
    with pytest.raises(ProfileError, match=message):
        parse_overrides([item])


def test_parse_overrides_rejects_a_value_and_a_table_at_one_key():
    with pytest.raises(ProfileError, match=r"--set 'flow.preset=fast': flow is already set to a value"):
        parse_overrides(["flow=1", "flow.preset=fast"])
    with pytest.raises(ProfileError, match=r"--set 'flow=1': flow is a table"):
        parse_overrides(["flow.preset=fast", "flow=1"])


def test_overrides_merge_tables_key_by_key():
    data = {"name": "p", "fps": 24, "diffusers": {"model": "/m", "steps": 4}, "flow": {"preset": "medium"}}
    merged = merge(data, parse_overrides(["diffusers.steps=8", "fps=12"]) | {"aspect": None})
    assert merged == {"name": "p", "fps": 12, "diffusers": {"model": "/m", "steps": 8}, "flow": {"preset": "medium"}}
    assert data["diffusers"]["steps"] == 4  # the profile data is not changed in place


def test_resolve_profile_applies_overrides_and_names_file_and_field(tmp_path):
    assert resolve_profile("draft", parse_overrides(["fps=12", "crf=30"])).fps == 12
    assert resolve_profile("draft", {"aspect": None}) == resolve_profile("draft")
    with pytest.raises(ProfileError, match=r"draft\.toml: fps: .*'abc'.*\(from the overrides\)"):
        resolve_profile("draft", parse_overrides(["fps=abc"]))
    with pytest.raises(ProfileError, match=r"draft\.toml: .*no_such_field.*(from the overrides|overrides: no_such_field)"):
        resolve_profile("draft", parse_overrides(["no_such_field=1"]))
    bad = _write(tmp_path / "bad.toml", 'name = "bad"\ncrf = 99\n')
    with pytest.raises(ProfileError, match=r"bad\.toml: crf: ") as exc:
        resolve_profile(str(bad))
    assert "overrides" not in str(exc.value)


# --------------------------------------------------------------------------- no import-time side effects


@pytest.mark.parametrize("module", ["pipeline.tracking", "pipeline.cli", "pipeline.config"])
def test_importing_leaves_the_environment_unchanged(module):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # OpenCV's own loader sets LD_LIBRARY_PATH when it is first imported (pipeline.models reaches
    # it through the stages): import it before the snapshot, so only our modules are judged.
    probe = (f"import os, cv2; before = dict(os.environ); import {module}; "
             "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)); "
             "print(changed)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120,
                         check=True, cwd=REPO).stdout.strip()
    assert out == "[]"


def test_mlflow_defaults_sets_only_what_is_unset(monkeypatch):
    from pipeline.tracking import mlflow_defaults

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")
    mlflow_defaults()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"
