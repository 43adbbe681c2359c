"""``anim serve`` and the commands that talk to the render service.

    anim serve [--host H] [--port P] [--data DIR]      the service: API, web page, queue, local Ray head
    anim users add NAME [--role producer|admin]        an account (asks for a password)
    anim users token NAME                              a new API token for NAME (printed once)
    anim submit SCRIPT... [--profile P] [--budget ¥N] [--wait]   queue renders (several: a batch)
    anim jobs [--series S] [--status S] [--producer U]          the job list
    anim job ID [--logs]                               one job: status, progress, files (or its log tail)
    anim cancel ID / anim retry ID

The client commands take ``--server URL`` (``ANIM_SERVER``) and ``--token T`` (``ANIM_TOKEN``).
"""
from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from pipeline.cli import _fail, _print_json, _yuan, err, out
from stages.records import AnimError

ServerOpt = typer.Option("http://127.0.0.1:8765", "--server", envvar="ANIM_SERVER", help="The render service's URL.")
TokenOpt = typer.Option(None, "--token", envvar="ANIM_TOKEN", help="Your API token (`anim users token NAME`).")
users_app = typer.Typer(no_args_is_help=True, help="Accounts of the render service (on the service's machine).")


def _client(server: str, token: str | None):
    from pipeline.service.client import ServiceClient

    if not token:
        raise _fail("no API token: give --token or set ANIM_TOKEN (an admin makes one with `anim users token NAME`)")
    return ServiceClient(server, token)


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(ctx: typer.Context,
          host: Optional[str] = typer.Option(None, "--host", help="Address to listen on [default: 127.0.0.1]; "
                                             "beyond loopback only once accounts exist."),
          port: Optional[int] = typer.Option(None, "--port", help="Port [default: 8765]."),
          data: Optional[Path] = typer.Option(None, "--data", help="The service's folder (ANIM_SERVICE_DATA).")) -> None:
    """Run the render service: the API and web page, the job queue, and a local Ray head (or the
    studio's cluster at RAY_ADDRESS) that outlives the service."""
    import uvicorn

    from pipeline.config import override_settings
    from pipeline.service import auth
    from pipeline.service.app import create_app
    from pipeline.service.db import open_database

    try:
        settings = override_settings(ctx.obj, service_host=host, service_port=port,
                                     service_data=str(data.absolute()) if data else None)
        with open_database(settings.service_db_url)() as db:
            users = auth.count_users(db)
    except AnimError as exc:
        raise _fail(exc, debug=ctx.obj.debug)
    if not loopback(settings.service_host) and not users:
        raise _fail(f"--host {settings.service_host}: the service listens beyond this machine only once accounts "
                    "exist; add one with `anim users add NAME`")
    if not users:
        err.print("warning: no accounts yet; every request is refused until you add one with `anim users add NAME`",
                  markup=False, highlight=False)
    out.print(f"render service on http://{settings.service_host}:{settings.service_port} "
              f"(data {settings.service_data}, database {settings.service_db_url})", markup=False, highlight=False)
    sys.stdout.flush()
    uvicorn.run(create_app(settings), host=settings.service_host, port=settings.service_port, log_level="warning")


@users_app.command("add")
def users_add(ctx: typer.Context, name: str = typer.Argument(...),
              role: str = typer.Option("producer", "--role", help="producer or admin."),
              password: Optional[str] = typer.Option(None, "--password", envvar="ANIM_PASSWORD",
                                                     help="[default: asked for]")) -> None:
    """Add an account with a password (for the web page); `anim users token` gives it API tokens."""
    from pipeline.service import auth
    from pipeline.service.db import open_database

    if password is None:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        with open_database(ctx.obj.service_db_url)() as db:
            user = auth.add_user(db, name, role, password)
    except AnimError as exc:
        raise _fail(exc)
    out.print(f"added {escape(user.username)} ({user.role})")


@users_app.command("token")
def users_token(ctx: typer.Context, name: str = typer.Argument(...),
                label: str = typer.Option("", "--label", help="What the token is for.")) -> None:
    """Print a new API token for NAME (kept only as a digest: it is shown this once)."""
    from pipeline.service import auth
    from pipeline.service.db import open_database

    try:
        with open_database(ctx.obj.service_db_url)() as db:
            token = auth.new_token(db, auth.user_named(db, name), label)
    except AnimError as exc:
        raise _fail(exc)
    sys.stdout.write(token + "\n")


def submit(scripts: list[Path] = typer.Argument(..., help="Fountain or YAML scripts; several are one batch."),
           profile: str = typer.Option("draft", "--profile", "-p"), aspect: Optional[str] = typer.Option(None, "--aspect"),
           budget: Optional[str] = typer.Option(None, "--budget", help="Cap per episode, e.g. ¥0.5."),
           batch_budget: Optional[str] = typer.Option(None, "--batch-budget", help="The batch's estimates together "
                                                      "must fit, else nothing is queued."),
           series: Optional[str] = typer.Option(None, "--series"),
           approval_gate: Optional[bool] = typer.Option(None, "--approval-gate/--no-approval-gate"),
           wait: bool = typer.Option(False, "--wait", help="Wait for the job(s) to end; exit 1 unless all succeed."),
           as_json: bool = typer.Option(False, "--json"), server: str = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Queue renders on the service."""
    from pipeline.service.db import ServiceError

    missing = [str(s) for s in scripts if not s.is_file()]
    if missing:
        raise _fail(f"{missing[0]}: no such file")
    with _client(server, token) as client:
        try:
            made = client.submit(scripts if len(scripts) > 1 else scripts[0], profile, aspect, _yuan(budget),
                                 series, approval_gate, _yuan(batch_budget))
            jobs = made["jobs"] if "jobs" in made else [made]
            for job in jobs:
                out.print(f"job {job['id']}: {escape(job['script_name'])} queued, estimated ¥{job['estimate_yuan']:.4f}")
            if wait:
                jobs = [client.wait(j["id"], timeout_s=24 * 3600) for j in jobs]
        except ServiceError as exc:
            raise _fail(exc)
    if as_json:
        _print_json(jobs)
    if wait:
        for job in jobs:
            out.print(_line(job))
        if any(j["status"] != "succeeded" for j in jobs):
            raise typer.Exit(1)


def _line(job: dict) -> str:
    p = job["progress"]
    why = f" ({job['stopped_reason']})" if job.get("stopped_reason") else ""
    error = f": {job['error']}" if job.get("error") and job["status"] in ("failed", "stopped") else ""
    return escape(f"job {job['id']} {job['status']}{why}: {p['shots_done']}/{p['shots_total']} shots, "
                  f"¥{p['spent_yuan']:.4f} of est. ¥{job['estimate_yuan']:.4f}{error}")


def jobs(series: Optional[str] = typer.Option(None, "--series"), status: Optional[str] = typer.Option(None, "--status"),
         producer: Optional[str] = typer.Option(None, "--producer"), as_json: bool = typer.Option(False, "--json"),
         server: str = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """The jobs you may see (an admin: everyone's)."""
    from pipeline.service.db import ServiceError

    with _client(server, token) as client:
        try:
            rows = client.jobs(series=series, status=status, producer=producer)
        except ServiceError as exc:
            raise _fail(exc)
    if as_json:
        _print_json(rows)
        return
    table = Table(title="render jobs")
    for col in ("id", "producer", "series", "script", "profile", "status", "shots", "¥ so far", "est. ¥", "updated"):
        table.add_column(col)
    for j in rows:
        p = j["progress"]
        table.add_row(str(j["id"]), escape(j["producer"] or ""), escape(j["series"]), escape(j["script_name"]),
                      j["profile"], j["status"] + (f" ({j['stopped_reason']})" if j["stopped_reason"] else ""),
                      f"{p['shots_done']}/{p['shots_total']}", f"{p['spent_yuan']:.4f}", f"{j['estimate_yuan']:.4f}",
                      j["updated_at"][:19])
    out.print(table)


def job(job_id: int = typer.Argument(...), logs: bool = typer.Option(False, "--logs", help="Print its log tail."),
        tail: int = typer.Option(200, "--tail"), as_json: bool = typer.Option(False, "--json"),
        server: str = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """One job: status, progress, ETA, files; or with --logs its render's log tail."""
    from pipeline.service.db import ServiceError

    with _client(server, token) as client:
        try:
            if logs:
                sys.stdout.write(client.logs(job_id, tail))
                return
            data = client.job(job_id)
        except ServiceError as exc:
            raise _fail(exc)
    if as_json:
        _print_json(data)
        return
    out.print(_line(data))
    p = data["progress"]
    eta = f", ETA {p['eta_s']:.0f} s" if p.get("eta_s") is not None else ""
    out.print(escape(f"attempt {data['attempt']} ({data['submission_id']}), stage {p['stage']}{eta}; "
                     f"files: {', '.join(data['files']) or 'none yet'}"))
    if data.get("mlflow_run_id"):
        out.print(escape(f"MLflow run: {data['mlflow_run_url'] or data['mlflow_run_id']}"))


def cancel(job_id: int = typer.Argument(...), server: str = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Cancel a job (its Ray job is stopped; finished nodes stay in the store)."""
    _act("cancel", job_id, server, token)


def retry(job_id: int = typer.Argument(...), server: str = ServerOpt, token: Optional[str] = TokenOpt) -> None:
    """Queue a failed, stopped or cancelled job again (a new attempt, resuming from the store)."""
    _act("retry", job_id, server, token)


def _act(what: str, job_id: int, server: str, token: str | None) -> None:
    from pipeline.service.db import ServiceError

    with _client(server, token) as client:
        try:
            data = getattr(client, what)(job_id)
        except ServiceError as exc:
            raise _fail(exc)
    out.print(_line(data))


def register(app: typer.Typer) -> None:
    for command in (serve, submit, jobs, job, cancel, retry):
        app.command()(command)
    app.add_typer(users_app, name="users")
