"""Configuration, resolved once at the entry point.

Two things are resolved here and nowhere else:

* ``Settings`` — where things run and are kept: Ray address, MLflow tracking URI, artifact
  store, price catalog, calibration tables, FX rate. Sources, lowest to highest:

  1. built-in defaults (the tables shipped inside the package, per-user XDG directories);
  2. config files (TOML, settings keys only): the studio file ``/etc/anim-pipeline/config.toml``
     then the user file ``$XDG_CONFIG_HOME/anim-pipeline/config.toml`` — or exactly the one
     file given by ``--config FILE`` / ``ANIM_CONFIG``;
  3. the environment (``RAY_ADDRESS``, ``MLFLOW_TRACKING_URI``, ``ANIM_STORE``, ``ANIM_PRICES``,
     ``ANIM_CALIBRATION``, ``ANIM_USD_CNY``, ``ANIM_PRICE_TIER``, ``ANIM_PRICE_PROVIDER``,
     ``ANIM_APPROVALS``);
  4. command-line options (``override_settings``, also used for per-command options such as
     ``plan --spot`` on top of what the CLI callback resolved).

  ``Settings.sources`` records which source gave each value.
* ``Profile`` — how an episode is rendered: a built-in profile name (``draft``,
  ``standard``) or a path to a TOML file, then overrides (``--aspect``, ``--set field=value``)
  merged into the raw TOML data before it is validated.

Stages never see either object: the pipeline passes them plain keyword arguments.
"""
from __future__ import annotations

import math
import os
import re
import tomllib
from importlib.resources import files
from pathlib import Path
from typing import Any, Mapping

from pydantic import Field, ValidationError

from stages.inbetween import RifeSettings
from stages.inbetween_adaptive import AdaptiveSettings
from stages.records import AnimError, ProfileError, Record
from pipeline.models import Profile

PROFILE_DIR = Path(__file__).with_name("profiles")
# The source checkout, for checkout-only tools (experiments, tests). No default below uses it:
# an installed package has no checkout.
REPO_ROOT = Path(__file__).resolve().parents[1]
# The shipped price catalog and calibration table. ``pipeline/cluster`` is a link to the
# repository's ``cluster/`` folder, so a checkout or an editable install reads the files in
# place and a built wheel carries copies as package data of ``pipeline``.
SHIPPED = Path(str(files("pipeline") / "cluster")).resolve()
STUDIO_CONFIG = Path("/etc/anim-pipeline/config.toml")


class SettingsError(AnimError):
    """A config file, environment variable or option that does not describe valid settings."""


# --------------------------------------------------------------------------- profile


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["flow.preset=fast", "diffusers.steps=8"]`` → ``{"flow": {"preset": "fast"}, "diffusers": {"steps": 8}}``.

    A value is read as a TOML literal (``8``, ``0.5``, ``true``, ``"text"``, ``[1, 2]``); anything
    that is not one is taken as a bare string (``fast``). A dotted key sets a field of a table.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(_KEY.fullmatch(p) for p in parts):
            raise ProfileError(f"--set {item!r}: expected FIELD=VALUE, e.g. flow.preset=fast or diffusers.steps=8")
        value = _literal(text.strip())
        table = out
        for depth, part in enumerate(parts[:-1]):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ProfileError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is already set to a value, "
                                   "not a table")
        if isinstance(table.get(parts[-1]), dict) and not isinstance(value, dict):
            raise ProfileError(f"--set {item!r}: {key.strip()} is a table, set its fields ({key.strip()}.FIELD=…)")
        table[parts[-1]] = value
    return out


def _literal(text: str) -> Any:
    """A TOML literal, or the text itself when it is not one (a bare word such as ``fast``)."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["v"] if parsed.keys() == {"v"} else text


def merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` on top; tables are merged key by key, ``None`` leaves a key as it is."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _flat_keys(data: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        if value is None:
            continue
        keys.add(prefix + key)
        if isinstance(value, Mapping):
            keys |= _flat_keys(value, f"{prefix}{key}.")
    return keys


def resolve_profile(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> Profile:
    """A built-in profile name or a TOML file path, with overrides merged into its data last.

    ``overrides`` is nested like the TOML file (``parse_overrides`` makes it from ``--set``
    items); ``None`` values are ignored, so optional CLI options can be passed as they are.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise ProfileError(
                f"unknown profile {name_or_path!r}; built-in profiles: {', '.join(builtin_profiles())}, "
                "or give a path to a .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"{path}: profile file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: not a valid TOML profile: {exc}") from None
    data.setdefault("name", path.stem)
    overrides = overrides or {}
    data = merge(data, overrides)
    given = _flat_keys(overrides)
    if bad := _non_finite(data):
        field, value = bad
        origin = " (from the overrides)" if field in given else ""
        raise ProfileError(f"{path}: {field}: {value!r} is not a finite number{origin}")
    try:
        return Profile(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        origin = " (from the overrides)" if any(field == k or field.startswith(k + ".") for k in given) else ""
        raise ProfileError(f"{path}: {field}: {err['msg']} (got {err.get('input')!r}){origin}") from None
    except ProfileError as exc:  # the profile model's own checks (tables of unknown backends …)
        origin = f" (overrides: {', '.join(sorted(given))})" if given else ""
        raise ProfileError(f"{path}: {exc}{origin}") from None


def _non_finite(data: Any, prefix: str = "") -> tuple[str, float] | None:
    """The first ``(dotted.field, value)`` in ``data`` that is a NaN or an infinity (TOML has
    ``nan`` and ``inf`` literals; no setting means either), else None."""
    if isinstance(data, float) and not math.isfinite(data):
        return prefix.rstrip("."), data
    items = data.items() if isinstance(data, Mapping) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        if found := _non_finite(value, f"{prefix}{key}."):
            return found
    return None


# Settings of a backend that name a local file its factory loads when a render builds it. They are
# checked where the command runs (relative paths are relative to the current directory), so that
# ``anim plan`` and the start of ``anim render`` refuse a missing file before any work. Backends
# whose factory checks its own files before any work (diffusers: a folder or the Hugging Face
# cache, which needs torch to resolve) are not listed.
LOCAL_FILES: dict[type[Record], tuple[str, ...]] = {RifeSettings: ("weights",), AdaptiveSettings: ("weights",)}


def check_backend_files(profile: Profile, given_as: str) -> None:
    """Refuse a profile whose selected backends name a local file that is missing or unreadable.

    ``given_as`` is how the profile was named on the command line (a built-in name or a path).
    Raises ProfileError naming the table, the setting, the path and the problem.
    """
    for stage, settings in profile.settings.items():
        for name in LOCAL_FILES.get(type(settings), ()):
            value = str(getattr(settings, name))
            if (problem := _file_problem(value)) is None:
                continue
            where = "" if value.startswith(("/", "~")) else f" (relative to the current folder {Path.cwd()})"
            hint = type(settings).model_fields[name].description or ""
            raise ProfileError(f"profile {given_as}: [{profile.entry(stage).name}] {name} = {value!r}: {problem}"
                               f"{where}; expected {hint.rstrip('.')}; nothing was rendered")


def _file_problem(value: str) -> str | None:
    """Why ``value`` does not name a readable file here, or None when it does."""
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~someone who is not a user here
        return f"cannot expand {value.split('/', 1)[0]!r} (no such user or no home folder)"
    if not path.exists():
        return "no such file"
    if not path.is_file():
        return "not a file"
    if not os.access(path, os.R_OK):
        return "not readable"
    return None


# --------------------------------------------------------------------------- settings


class Settings(Record):
    """Where a render runs and what it reads and writes; written out with every render."""

    ray_address: str | None = Field(None, description="None starts a local Ray cluster.")
    tracking_uri: str
    store: str = Field(description="Artifact store: a local path or any fsspec URL (s3://, oss://, file://).")
    prices: str = Field(description="Price catalog CSV (default: the one shipped with the package).")
    calibration: str = Field(description="Shipped throughput calibration table: the starting point.")
    user_calibration: str = Field(description="Rows measured on this machine or cluster (written by "
                                  "`anim calibrate`); they win over shipped rows with the same key.")
    approvals: str = Field(description="Producer decisions on storyboard panels: a SQLite file or a database "
                           "URL (postgresql://…); apart from the artifact store, never garbage-collected.")
    nights: str | None = Field(None, description="Which nights of each series ran (pipeline.nightly): a SQLite "
                               "file or a database URL (postgresql://…); None = the per-user default.")
    usd_cny: float = Field(7.10, gt=0, allow_inf_nan=False, description="Yuan per US dollar, finite and above 0.")
    price_tier: str = "on-demand"
    price_provider: str | None = Field(None, description="Price rows of this provider only; None = cheapest.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray cluster; None = all.")
    debug: bool = Field(False, description="Print full tracebacks (--debug, ANIM_DEBUG=1).")
    service_data: str = Field(description="The render service's folder: uploaded scripts and outputs per job, "
                              "the local Ray head's record.")
    service_db: str | None = Field(None, description="The service's job table and accounts: a database URL; "
                                   "None = sqlite:///<service_data>/service.db.")
    service_host: str = Field("127.0.0.1", description="Where `anim serve` listens; beyond loopback only with "
                              "accounts configured.")
    service_port: int = Field(8765, ge=1, le=65535)
    service_max_renders: int | None = Field(None, ge=1, description="Renders at once, no more; None = one per "
                                            "CPU of the cluster, and up to twice that while a CPU slot is idle and "
                                            "its processors have room.")
    service_series: str | None = Field(None, description="Series manifests (*.toml) whose schedules the service "
                                       "runs itself (pipeline.service.schedules); None = <service_data>/series.")
    config_files: list[str] = Field(default_factory=list, description="Config files read, lowest first.")
    sources: dict[str, str] = Field(default_factory=dict, description="Per setting, the source of its value.")

    @property
    def calibration_paths(self) -> tuple[str, str]:
        """The calibration layers, lowest precedence first: shipped, then this machine's rows."""
        return self.calibration, self.user_calibration

    @property
    def service_db_url(self) -> str:
        return self.service_db or f"sqlite:///{Path(self.service_data).expanduser().absolute() / 'service.db'}"

    @property
    def service_series_dir(self) -> Path:
        return Path(self.service_series or Path(self.service_data) / "series").expanduser().absolute()


# Keys a config file may set (the settings themselves; ``debug`` and the bookkeeping are not).
KEYS = ("ray_address", "tracking_uri", "store", "prices", "calibration", "user_calibration", "approvals", "nights",
        "usd_cny", "price_tier", "price_provider", "num_cpus", "service_data", "service_db", "service_host",
        "service_port", "service_max_renders", "service_series")
ENV = {"ray_address": "RAY_ADDRESS", "tracking_uri": "MLFLOW_TRACKING_URI", "store": "ANIM_STORE",
       "prices": "ANIM_PRICES", "calibration": "ANIM_CALIBRATION", "usd_cny": "ANIM_USD_CNY",
       "price_tier": "ANIM_PRICE_TIER", "price_provider": "ANIM_PRICE_PROVIDER", "approvals": "ANIM_APPROVALS",
       "nights": "ANIM_NIGHTS", "service_data": "ANIM_SERVICE_DATA", "service_db": "ANIM_SERVICE_DB",
       "service_host": "ANIM_SERVICE_HOST", "service_port": "ANIM_SERVICE_PORT",
       "service_max_renders": "ANIM_SERVICE_MAX_RENDERS", "service_series": "ANIM_SERVICE_SERIES"}
_PATH_KEYS = ("store", "prices", "calibration", "user_calibration", "approvals", "nights", "service_data",
              "service_series")


def _home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def _xdg(env: Mapping[str, str], var: str, fallback: str) -> Path:
    return Path(env.get(var) or _home(env) / fallback)


def default_store(env: Mapping[str, str] | None = None) -> str:
    """Per-user artifact store shared by every render on this machine."""
    env = os.environ if env is None else env
    return str(_xdg(env, "XDG_CACHE_HOME", ".cache") / "anim-pipeline" / "store")


def shipped_table(name: str) -> Path:
    """A table shipped with the package: ``prices.csv`` or ``calibration.csv``."""
    return SHIPPED / name


def find_config_files(env: Mapping[str, str] | None = None, config: str | Path | None = None,
                 studio_file: Path = STUDIO_CONFIG) -> list[Path]:
    """The config files read, lowest precedence first: the one given (``--config``, else
    ``ANIM_CONFIG``), or the studio file then the user file, each where it exists."""
    env = os.environ if env is None else env
    given = config or env.get("ANIM_CONFIG")
    if given:
        what = "--config" if config else "ANIM_CONFIG"
        path = _expand(str(given), f"config file given by {what}")
        if not path.is_file():
            raise SettingsError(f"{path}: config file not found (given by {what})")
        return [path]
    user = _xdg(env, "XDG_CONFIG_HOME", ".config") / "anim-pipeline" / "config.toml"
    return [p for p in (studio_file, user) if p.is_file()]


def read_config(path: Path) -> dict[str, Any]:
    """The settings in one TOML config file; relative paths in it are relative to the file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: not a valid TOML config file: {exc}") from None
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise SettingsError(f"{path}: unknown setting {unknown[0]!r}; a config file sets only: {', '.join(KEYS)}")
    for key in _PATH_KEYS:
        value = data.get(key)
        if isinstance(value, str) and "://" not in value:
            local = _expand(value, f"{path}: setting {key}")
            data[key] = str(local if local.is_absolute() else path.parent / local)
    return data


def _expand(text: str, what: str) -> Path:
    """``text`` as a path with ``~`` expanded; a ``~user`` that is not a user here (or a home that
    cannot be found) is a SettingsError naming ``what``."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise SettingsError(f"{what}: {text!r}: cannot expand {text.split('/', 1)[0]!r} (no such user or no "
                            "home folder)") from None


def _flag(env: Mapping[str, str], var: str) -> bool:
    text = env.get(var, "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"environment variable {var}={env[var]!r}: expected 1 or 0")


def resolve_settings(env: Mapping[str, str] | None = None, *, config: str | Path | None = None,
                     debug: bool | None = None, studio_file: Path = STUDIO_CONFIG, **cli: Any) -> Settings:
    """Defaults < config file(s) < environment < CLI options, resolved once at the entry point.

    ``env`` defaults to ``os.environ``; ``config`` is ``--config FILE``; ``debug`` is ``--debug``
    (``None``: from ``ANIM_DEBUG``); ``cli`` are options naming settings (``None`` = not given).
    The result is written out with every render.
    """
    env = os.environ if env is None else env
    # 1. Built-in defaults: nothing here depends on the current directory except the MLflow
    #    database, which is documented to sit where the command runs.
    values: dict[str, Any] = {
        "tracking_uri": f"sqlite:///{Path.cwd() / 'mlflow.db'}",
        "store": default_store(env),
        "prices": str(shipped_table("prices.csv")),
        "calibration": str(shipped_table("calibration.csv")),
        "user_calibration": str(_xdg(env, "XDG_DATA_HOME", ".local/share") / "anim-pipeline" / "calibration.csv"),
        "approvals": str(_xdg(env, "XDG_DATA_HOME", ".local/share") / "anim-pipeline" / "approvals.db"),
        "service_data": str(_xdg(env, "XDG_DATA_HOME", ".local/share") / "anim-pipeline" / "service"),
        "nights": str(_xdg(env, "XDG_DATA_HOME", ".local/share") / "anim-pipeline" / "nights.db"),
    }
    sources = {key: "default" for key in KEYS}
    # 2. Config files, studio then user (or the one given).
    files_read = find_config_files(env, config, studio_file)
    for path in files_read:
        data = read_config(path)
        values.update(data)
        sources.update({key: str(path) for key in data})
    # 3. The environment; an empty variable counts as unset.
    for key, var in ENV.items():
        if env.get(var):
            values[key] = env[var]
            sources[key] = f"${var}"
    base = _validated(values | {"debug": _flag(env, "ANIM_DEBUG") if debug is None else debug,
                                "config_files": [str(p) for p in files_read], "sources": sources})
    # 4. The command line.
    return override_settings(base, **cli)


def override_settings(settings: Settings, **cli: Any) -> Settings:
    """``settings`` with command-line values on top (``None`` = option not given).

    The last step of ``resolve_settings``, and the way a command applies its own options (such
    as ``plan --spot``) to the settings the CLI resolved once.
    """
    given = {key: value for key, value in cli.items() if value is not None}
    unknown = [key for key in given if key not in KEYS]
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]!r}; settings are: {', '.join(KEYS)}")
    if not given:
        return settings
    sources = settings.sources | {key: "command line" for key in given}
    return _validated(settings.model_dump() | given | {"sources": sources})


def _validated(values: dict[str, Any]) -> Settings:
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "?"
        raise SettingsError(f"{_where(values, key)}: setting {key}: {err['msg']} (got {err.get('input')!r})") from None
    # A local path whose ~user cannot be expanded would fail in whichever module opens it first.
    for key in _PATH_KEYS:
        value = getattr(settings, key, None)
        if isinstance(value, str) and value.startswith("~"):
            _expand(value, f"{_where(values, key)}: setting {key}")
    return settings


def _where(values: dict[str, Any], key: str) -> str:
    """The source of setting ``key``, as a user reads it."""
    source = values.get("sources", {}).get(key, "default")
    where = {"default": "built-in default", "command line": "command line"}.get(source)
    return where or (f"environment variable {source[1:]}" if source.startswith("$") else source)
