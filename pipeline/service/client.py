"""A Python client of the render service's HTTP API (``anim submit``, ``anim jobs``, the nightly
batch, tests). Every refusal raises ``ServiceError`` with the server's one-line message."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from pipeline.service.db import TERMINAL, ServiceError

__all__ = ["ServiceClient", "ServiceError"]


class ServiceClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceError(f"the render service at {self.url} did not answer: {exc}", 503) from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error") or response.text
            except ValueError:
                message = response.text.strip() or response.reason_phrase
            raise ServiceError(str(message), response.status_code)
        return response

    @staticmethod
    def _form(profile: str, aspect: str | None, budget_yuan: float | None, **more: Any) -> dict[str, str]:
        data = {"profile": profile, **({"aspect": aspect} if aspect else {})}
        if budget_yuan is not None:
            data["budget_yuan"] = repr(float(budget_yuan))
        data.update({k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in more.items() if v is not None})
        return data

    def me(self) -> dict:
        return self._call("GET", "/api/me").json()

    def plan(self, script: str | Path, profile: str = "draft", aspect: str | None = None,
             budget_yuan: float | None = None) -> dict:
        path = Path(script)
        return self._call("POST", "/api/plan", data=self._form(profile, aspect, budget_yuan),
                          files={"script": (path.name, path.read_bytes())}).json()

    def submit(self, script: str | Path | list[str | Path], profile: str = "draft", aspect: str | None = None,
               budget_yuan: float | None = None, series: str | None = None, approval_gate: bool | None = None,
               batch_budget_yuan: float | None = None, key: str | None = None) -> dict:
        """One job (a dict), or for a list of scripts a batch (``{"jobs": [...]}``), all or nothing.
        ``key``: an Idempotency-Key — sending the same submission again returns its jobs, queues none."""
        paths = [Path(p) for p in (script if isinstance(script, list) else [script])]
        files = [("script", (p.name, p.read_bytes())) for p in paths]
        data = self._form(profile, aspect, budget_yuan, series=series, approval_gate=approval_gate,
                          batch_budget_yuan=batch_budget_yuan)
        headers = {"Idempotency-Key": key} if key else None
        return self._call("POST", "/api/jobs", data=data, files=files, headers=headers).json()

    def jobs(self, series: str | None = None, status: str | None = None, producer: str | None = None) -> list[dict]:
        params = {k: v for k, v in (("series", series), ("status", status), ("producer", producer)) if v}
        return self._call("GET", "/api/jobs", params=params).json()["jobs"]

    def job(self, job_id: int) -> dict:
        return self._call("GET", f"/api/jobs/{job_id}").json()

    def wait(self, job_id: int, timeout_s: float = 600, until: tuple[str, ...] = TERMINAL,
             poll_s: float = 0.5) -> dict:
        """Poll until the job's status is one of ``until`` (terminal by default); ServiceError 504
        when it is not within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job["status"] in until:
                return job
            if time.monotonic() > deadline:
                raise ServiceError(f"job {job_id} is still {job['status']} after {timeout_s:g} s", 504)
            time.sleep(poll_s)

    def cancel(self, job_id: int) -> dict:
        return self._call("POST", f"/api/jobs/{job_id}/cancel").json()

    def retry(self, job_id: int) -> dict:
        return self._call("POST", f"/api/jobs/{job_id}/retry").json()

    def logs(self, job_id: int, tail: int = 200) -> str:
        return self._call("GET", f"/api/jobs/{job_id}/logs", params={"tail": tail}).text

    def panels(self, job_id: int) -> list[dict]:
        return self._call("GET", f"/api/jobs/{job_id}/panels").json()["panels"]

    def approve(self, job_id: int, shot: str | None = None, decision: str = "approve", comment: str = "") -> dict:
        if shot is None:
            return self._call("POST", f"/api/jobs/{job_id}/approve-all").json()
        return self._call("POST", f"/api/jobs/{job_id}/approvals",
                          json={"shot": shot, "decision": decision, "comment": comment}).json()

    def download(self, job_id: int, name: str, dest: str | Path) -> Path:
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / name
        with self.http.stream("GET", f"/api/jobs/{job_id}/files/{name}") as response:
            if response.status_code >= 400:
                response.read()
                try:
                    message = response.json().get("error")
                except ValueError:
                    message = response.text
                raise ServiceError(str(message), response.status_code)
            tmp = dest.with_name(f".{dest.name}.part")
            with tmp.open("wb") as f:
                for chunk in response.iter_bytes():
                    f.write(chunk)
            tmp.replace(dest)
        return dest
