"""The render service's HTTP API (FastAPI): accounts, the job queue, progress, approvals, files.

``create_app(settings)`` opens (and migrates) the database, finds or starts the Ray cluster,
reconciles the job table against it and runs the dispatcher thread for as long as the app runs.
Every ``/api/*`` route but ``POST /api/session`` needs a bearer token or the session cookie;
a producer sees only their own jobs (another's is a 404, as if it did not exist). The web page
(``pipeline/service/web.py``, when present) is included as a router of the same app.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import Depends, FastAPI, File, Form, Header, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.service import auth, schedules
from pipeline.service.cluster import JobsEndpoint, local_endpoint, start_local_head, studio_endpoint
from pipeline.service.db import ACTIVE, STATUSES, TERMINAL, Job, ServiceError, User, open_database
from pipeline.service.jobs import MAX_UPLOAD_BYTES, JobService, Planned, QueuePolicy, Upload, loop

COOKIE = "anim_session"
CSRF_HEADER = ("x-anim", "1")  # the web page sends it on every change (pipeline/service/web.py)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
MAX_BATCH = 50


def queue_policy(settings, endpoint: JobsEndpoint) -> QueuePolicy:
    """``service_max_renders`` when set (that many at once, no more); else one render per CPU of the
    local head (4 on a studio cluster) and, while the cluster has an idle CPU slot, nothing waiting for
    one and processors with room (``Load.idle``), up to twice that."""
    if settings.service_max_renders:
        return QueuePolicy.fixed(settings.service_max_renders)
    base = (settings.num_cpus or os.cpu_count() or 1) if endpoint.local else 4
    return QueuePolicy(base, 2 * base)


def create_app(settings, *, endpoint: JobsEndpoint | None = None, dispatch: bool = True) -> FastAPI:
    """The service app for resolved ``settings``. ``endpoint``: a Jobs API to use (tests start
    their own head); by default the studio's (``RAY_ADDRESS``) or the local head in the data dir."""
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sessions = open_database(settings.service_db_url)
        ep = endpoint or (studio_endpoint(settings.ray_address) if settings.ray_address else
                          local_endpoint(_data(settings), settings.num_cpus))
        # a local head of the service's own is replaced if it dies while the service runs
        new_head = None if endpoint is not None or settings.ray_address else (
            lambda: start_local_head(_data(settings) / "ray", settings.num_cpus))
        service = JobService(settings, sessions, ep, queue_policy(settings, ep), new_head=new_head)
        app.state.service = service
        stop = threading.Event()
        # what a render run by the service itself imports, loaded now rather than on the first no-op
        threading.Thread(target=_warm_up, name="anim-warm-up", daemon=True).start()
        if dispatch:
            service.reconcile_cancelled()
            service.tick()  # the reconciliation: the table against Ray's job list, before any request
            thread = threading.Thread(target=loop, args=(service, stop), name="anim-dispatcher", daemon=True)
            thread.start()
            state["thread"] = thread
            # each series manifest's nightly, run by the service itself (pipeline.service.schedules)
            app.state.schedules = schedules.Schedules(settings, sessions)
            threading.Thread(target=schedules.loop, args=(app.state.schedules, stop), name="anim-schedules",
                             daemon=True).start()
        yield
        stop.set()
        if "thread" in state:
            state["thread"].join(timeout=10)

    app = FastAPI(title="anim-pipeline render service", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.include_router(_api())
    try:
        from pipeline.service import web
    except ImportError:
        web = None
    if web is not None:
        app.include_router(web.router)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        return JSONResponse({"error": f"{where}: {err.get('msg')}"}, status_code=422)

    @app.middleware("http")
    async def _limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_UPLOAD_BYTES * MAX_BATCH + 65536:
            return JSONResponse({"error": f"request of {length} bytes refused: uploads are limited to "
                                          f"{MAX_UPLOAD_BYTES} bytes a script"}, status_code=413)
        return await call_next(request)

    return app


def _warm_up() -> None:
    import importlib

    for module in ("pipeline.cli", "pipeline.render", "pipeline.tracking", "pipeline.publish", "mlflow"):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the render that needs it reports it
            return


def _data(settings):
    from pathlib import Path

    return Path(settings.service_data).expanduser().absolute()


# ---------------------------------------------------------------------- auth dependencies


def service_of(request: Request) -> JobService:
    return request.app.state.service


def current_user(request: Request) -> User:
    """The user a request comes from (API token or session cookie), else 401. A change made with
    the cookie must carry the page's ``X-Anim: 1`` header (a cross-site form cannot set one)."""
    header = request.headers.get("authorization", "")
    bearer = header[7:].strip() if header.lower().startswith("bearer ") else None
    with service_of(request).sessions() as db:
        user = auth.user_for(db, bearer=bearer, cookie=request.cookies.get(COOKIE))
    if user is None:
        raise ServiceError("sign in first: a bearer token (anim users token NAME) or the session cookie", 401)
    if not bearer and request.method not in SAFE_METHODS and request.headers.get(CSRF_HEADER[0]) != CSRF_HEADER[1]:
        raise ServiceError("a change made with the session cookie needs the header X-Anim: 1", 403)
    return user


def _job(db, user: User, job_id: int) -> Job:
    job = db.get(Job, job_id)
    if job is None or (user.role != "admin" and job.producer_id != user.id):
        raise ServiceError(f"no job {job_id}", 404)
    return job


class Decision(BaseModel):
    shot: str
    decision: str
    comment: str = ""


def _api():
    from fastapi import APIRouter

    api = APIRouter(prefix="/api")

    @api.post("/session")
    def sign_in(request: Request, response: Response, username: str = Form(...), password: str = Form(...)):
        with service_of(request).sessions() as db:
            user = auth.check_password(db, username, password)
            if user is None:
                raise ServiceError("wrong user name or password", 401)
            cookie = auth.new_session(db, user)
        response.set_cookie(COOKIE, cookie, httponly=True, samesite="lax", max_age=auth.SESSION_DAYS * 86400,
                            secure=request.url.scheme == "https", path="/")
        return {"username": user.username, "role": user.role}

    @api.delete("/session")
    def sign_out(request: Request, response: Response, user: User = Depends(current_user)):
        if cookie := request.cookies.get(COOKIE):
            with service_of(request).sessions() as db:
                auth.end_session(db, cookie)
        response.delete_cookie(COOKIE, path="/")
        return {"signed_out": user.username}

    @api.get("/me")
    def me(user: User = Depends(current_user)):
        return {"username": user.username, "role": user.role}

    @api.post("/plan")
    def plan(request: Request, script: UploadFile = File(...), profile: str = Form("draft"),
             aspect: Optional[str] = Form(None), budget_yuan: Optional[float] = Form(None),
             approval_gate: Optional[bool] = Form(None), user: User = Depends(current_user)):
        planned = service_of(request).check(_read(script), profile, aspect or None, approval_gate)
        return planned.summary(budget_yuan)

    @api.post("/jobs", status_code=201)
    def submit(request: Request, response: Response, script: list[UploadFile] = File(...),
               profile: str = Form("draft"), aspect: Optional[str] = Form(None),
               budget_yuan: Optional[float] = Form(None),
               series: Optional[str] = Form(None), approval_gate: Optional[bool] = Form(None),
               batch_budget_yuan: Optional[float] = Form(None), user: User = Depends(current_user),
               idempotency_key: Optional[str] = Header(None)):
        """Queue the scripts. A client that may send a submission twice (a retry after a timeout, a
        nightly resumed) names it with an ``Idempotency-Key`` header: a repeat returns the jobs the
        first one queued (status 200) and queues nothing."""
        svc = service_of(request)
        key = (idempotency_key or "").strip() or None
        if key is not None and (len(key) > 180 or not key.isprintable()):
            raise ServiceError("Idempotency-Key: at most 180 printable characters", 422)
        if len(script) > MAX_BATCH:
            raise ServiceError(f"{len(script)} scripts in one batch; at most {MAX_BATCH}", 413)
        with svc.sessions() as db:
            jobs, new = svc.repeated(db, user, key), False
        if not jobs:  # (``create`` asks again under the queue's lock: two repeats at once queue once)
            planned: list[Planned] = [svc.check(_read(f), profile, aspect or None, approval_gate) for f in script]
            jobs, new = svc.create(user, planned, budget_yuan=budget_yuan, series=(series or "").strip(),
                                   batch_budget_yuan=batch_budget_yuan, client_key=key)
        if not new:
            response.status_code = 200
        with svc.sessions() as db:
            views = [svc.view(db, db.get(Job, j.id)) for j in jobs]
        return views[0] if len(views) == 1 else {"jobs": views}

    @api.get("/jobs")
    def jobs(request: Request, series: Optional[str] = None, status: Optional[str] = None,
             producer: Optional[str] = None, user: User = Depends(current_user)):
        svc = service_of(request)
        if status and status not in STATUSES:
            raise ServiceError(f"status {status!r}: one of {', '.join(STATUSES)}", 422)
        with svc.sessions() as db:
            query = select(Job).order_by(Job.id.desc())
            if user.role != "admin":
                query = query.where(Job.producer_id == user.id)
            if producer:
                query = query.join(User, User.id == Job.producer_id).where(User.username == producer)
            if series:
                query = query.where(Job.series == series)
            if status:
                query = query.where(Job.status == status)
            return {"jobs": [svc.view(db, j) for j in db.scalars(query)]}

    @api.get("/jobs/{job_id}")
    def job(request: Request, job_id: int, user: User = Depends(current_user)):
        svc = service_of(request)
        with svc.sessions() as db:
            return svc.view(db, _job(db, user, job_id))

    @api.get("/jobs/{job_id}/events")
    def events(request: Request, job_id: int, user: User = Depends(current_user)):
        svc = service_of(request)
        with svc.sessions() as db:
            _job(db, user, job_id)

        def look() -> dict:
            with svc.sessions() as db:
                return svc.view(db, db.get(Job, job_id))

        async def stream():
            # async: a watching page holds no worker thread between looks (only the look itself runs in one)
            last, sent_at = None, 0.0
            while not await request.is_disconnected():
                view = await asyncio.to_thread(look)
                text = json.dumps(view, ensure_ascii=False)
                now = time.monotonic()
                if text != last or (view["status"] in ACTIVE and now - sent_at >= 1.0):
                    yield f"data: {text}\n\n"
                    last, sent_at = text, now
                if view["status"] in TERMINAL:
                    return
                await asyncio.sleep(0.25)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.get("/jobs/{job_id}/logs", response_class=PlainTextResponse)
    def logs(request: Request, job_id: int, tail: int = 200, user: User = Depends(current_user)):
        svc = service_of(request)
        with svc.sessions() as db:
            return svc.logs(_job(db, user, job_id), tail=min(max(tail, 1), 5000))

    @api.get("/jobs/{job_id}/panels")
    def panels(request: Request, job_id: int, user: User = Depends(current_user)):
        svc = service_of(request)
        with svc.sessions() as db:
            return {"panels": svc.panels(_job(db, user, job_id))}

    @api.get("/jobs/{job_id}/panels/{shot}.png")
    def panel(request: Request, job_id: int, shot: str, user: User = Depends(current_user)):
        svc = service_of(request)
        with svc.sessions() as db:
            return FileResponse(svc.panel(_job(db, user, job_id), shot), media_type="image/png")

    def change(request: Request, job_id: int, user: User, act) -> dict:
        """``act(service, db, job)`` on a job the user may change, under the state lock; the job after."""
        svc = service_of(request)
        with svc.lock, svc.sessions() as db:
            job = _job(db, user, job_id)
            act(svc, db, job)
            return svc.view(db, job)

    @api.post("/jobs/{job_id}/approvals")
    def approve(request: Request, job_id: int, body: Decision, user: User = Depends(current_user)):
        return change(request, job_id, user,
                      lambda svc, db, job: svc.decide(db, job, [body.shot], body.decision, user.username, body.comment))

    @api.post("/jobs/{job_id}/approve-all")
    def approve_all(request: Request, job_id: int, user: User = Depends(current_user)):
        return change(request, job_id, user, lambda svc, db, job: svc.decide(db, job, None, "approve", user.username, ""))

    @api.post("/jobs/{job_id}/cancel")
    def cancel(request: Request, job_id: int, user: User = Depends(current_user)):
        return change(request, job_id, user, lambda svc, db, job: svc.cancel(db, job, user.username))

    @api.post("/jobs/{job_id}/retry")
    def retry(request: Request, job_id: int, user: User = Depends(current_user)):
        return change(request, job_id, user, lambda svc, db, job: svc.retry(db, job, user.username))

    @api.get("/jobs/{job_id}/files/{name}")
    def file(request: Request, job_id: int, name: str, user: User = Depends(current_user)):
        svc = service_of(request)
        with svc.sessions() as db:
            path = svc.file(_job(db, user, job_id), name)
        return FileResponse(path, filename=name)

    return api


def _read(upload: UploadFile) -> Upload:
    data = upload.file.read(MAX_UPLOAD_BYTES + 1)
    name = upload.filename or "script"
    if len(data) > MAX_UPLOAD_BYTES:
        raise ServiceError(f"{name}: more than the upload limit of {MAX_UPLOAD_BYTES} bytes", 413)
    return Upload(name, data)
