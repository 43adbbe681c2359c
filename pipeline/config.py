"""Configuration, resolved once at the entry point.

Two things are resolved here and nowhere else:

* ``Settings`` — where things run and are kept: Ray address, MLflow tracking URI, artifact
  store, price catalog, FX rate. Sources, lowest to highest: built-in defaults, then the
  environment (``RAY_ADDRESS``, ``MLFLOW_TRACKING_URI``, ``ANIM_STORE``, ``ANIM_USD_CNY``,
  ``ANIM_PRICE_TIER``, ``ANIM_PRICE_PROVIDER``), then explicit CLI options.
* ``Profile`` — how an episode is rendered: a built-in profile name (``draft``,
  ``standard``) or a path to a TOML file, then CLI overrides such as ``--aspect``.

Stages never see either object: the pipeline passes them plain keyword arguments.
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from pydantic import Field, ValidationError

from stages.records import ProfileError
from stages.records import Record
from pipeline.models import Profile

PROFILE_DIR = Path(__file__).with_name("profiles")
REPO_ROOT = Path(__file__).resolve().parents[1]


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def resolve_profile(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> Profile:
    """A built-in profile name or a TOML file path, with CLI overrides applied last."""
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
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Profile(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ProfileError(f"{path}: {field}: {err['msg']} (got {err.get('input')!r})") from None


def default_store() -> str:
    """Per-user artifact store shared by every render on this machine."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "anim-pipeline" / "store")


class Settings(Record):
    ray_address: str | None = Field(None, description="None starts a local Ray cluster.")
    tracking_uri: str
    store: str = Field(description="Artifact store: a local path or any fsspec URL (s3://, oss://, file://).")
    prices: str = str(REPO_ROOT / "cluster" / "prices.csv")
    calibration: str = str(REPO_ROOT / "cluster" / "calibration.csv")
    usd_cny: float = 7.10
    price_tier: str = "on-demand"
    price_provider: str | None = Field(None, description="Price rows of this provider only; None = cheapest.")
    num_cpus: int | None = Field(None, description="CPUs for a local Ray cluster; None = all.")


def resolve_settings(env: Mapping[str, str] | None = None, **cli: Any) -> Settings:
    """Defaults < environment < CLI options. The result is written out with every render."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {
        "tracking_uri": f"sqlite:///{Path.cwd() / 'mlflow.db'}",
        "store": default_store(),
    }
    from_env = {
        "ray_address": env.get("RAY_ADDRESS"),
        "tracking_uri": env.get("MLFLOW_TRACKING_URI"),
        "store": env.get("ANIM_STORE"),
        "usd_cny": env.get("ANIM_USD_CNY"),
        "price_tier": env.get("ANIM_PRICE_TIER"),
        "price_provider": env.get("ANIM_PRICE_PROVIDER"),
    }
    values.update({k: v for k, v in from_env.items() if v})
    values.update({k: v for k, v in cli.items() if v is not None})
    try:
        return Settings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ProfileError(f"setting {err['loc'][0]}: {err['msg']} (got {err.get('input')!r})") from None
