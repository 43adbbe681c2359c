"""Which cluster a measurement was taken on: a short stable id and a readable label.

Calibration rows learned from renders are kept per cluster (``pipeline.calibration``), so an
estimate on a studio's cluster comes from that cluster's own measurements, never from the
machine that wrote the shipped table.

* A **local** cluster (no ``RAY_ADDRESS``) is this machine: its CPU model, the cores Ray gets
  (the ``num_cpus`` setting, else the cores this process may run on) and its GPUs (model and
  count from ``nvidia-smi``; none where it is absent).
* An **existing** cluster (``RAY_ADDRESS``) is named by its address: planning must not connect
  to Ray to ask for its nodes. A render records the resources it actually held beside its
  measurements, for information.

Nothing here reads the environment or a config file: the entry point passes the settings in.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field

from stages.records import Record


class Fingerprint(Record):
    """What makes two clusters measure the same: the id keys their calibration rows."""

    kind: Literal["local", "address"]
    cpu: str | None = Field(None, description="CPU model (local).")
    cores: int | None = Field(None, ge=1, description="CPU cores Ray schedules on (local).")
    gpu: str | None = Field(None, description="GPUs as '<count>x <model>', '+'-joined; None: no GPU (local).")
    address: str | None = Field(None, description="RAY_ADDRESS of an existing cluster.")

    @property
    def id(self) -> str:
        """12 hex digits of sha256 over the fields: the same machine shape gives the same id everywhere."""
        blob = json.dumps(self.model_dump(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]

    @property
    def label(self) -> str:
        if self.kind == "address":
            return f"Ray cluster at {self.address}"
        return f"local: {self.cpu}, {self.cores} cores, {self.gpu or 'no GPU'}"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what the platform reports."""
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers narrow), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def gpu_models(nvidia_smi: str | None = None) -> str | None:
    """'<count>x <model>' per GPU model ('1x NVIDIA H200'), or None when there is no GPU or no
    ``nvidia-smi`` (``nvidia_smi`` names the program; default: the one on PATH)."""
    program = nvidia_smi or shutil.which("nvidia-smi")
    if not program:
        return None
    try:
        done = subprocess.run([program, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []
    if not names:
        return None  # a driver without a device answers with an error: no GPU to price
    return " + ".join(f"{n}x {name}" for name, n in sorted(Counter(names).items()))


def fingerprint(ray_address: str | None, num_cpus: int | None, *, nvidia_smi: str | None = None) -> Fingerprint:
    """The fingerprint of the cluster a render with these settings runs on, without starting Ray."""
    if ray_address and ray_address.strip():
        return Fingerprint(kind="address", address=ray_address.strip())
    return Fingerprint(kind="local", cpu=cpu_model(), cores=num_cpus or usable_cores(),
                       gpu=gpu_models(nvidia_smi))
