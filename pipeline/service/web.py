"""The producers' web page: HTML pages served by the render service itself.

The pages are server-rendered Jinja2 templates (autoescaped) and a little plain JavaScript
(``static/*.js``, no build step, nothing from a CDN). Every piece of job data reaches the page
through the service's own HTTP contract (``/api/*``), fetched by the browser with the session
cookie, so the page sees exactly what the API lets the signed-in producer see and no more. The
scripts write user text with ``textContent`` only, never as HTML.

Routes (the core app mounts them with ``app.include_router(web.router)``):

    GET /                 -> /jobs
    GET /login            sign-in form (POST /api/session)
    GET /jobs             job list, filtered by series, status and producer
    GET /jobs/new         upload a script, choose profile/aspect/budget, see the estimate, submit
    GET /jobs/{id}        live progress, cost and log tail; storyboard approval; cancel, retry,
                          downloads, the MLflow run
    GET /static/{name}    the page's CSS, JavaScript and the Noto Sans CJK font

State-changing requests from the page carry the header ``X-Anim: 1`` (see ``CSRF_HEADER``): with
the SameSite=Lax cookie this is the page's CSRF defence, and the API refuses a cookie-authenticated
change without it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import get_args
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from pipeline.config import builtin_profiles
from pipeline.models import Profile
from pipeline.service.db import STATUSES
from stages.draw import font_path

HERE = Path(__file__).parent
SESSION_COOKIE = "anim_session"
CSRF_HEADER = ("X-Anim", "1")
ASPECTS = get_args(Profile.model_fields["aspect"].annotation)

# The only files /static serves: a fixed map, never a path the client chose.
STATIC = {
    "anim.css": "text/css; charset=utf-8",
    "anim.js": "text/javascript; charset=utf-8",
    "login.js": "text/javascript; charset=utf-8",
    "jobs.js": "text/javascript; charset=utf-8",
    "new.js": "text/javascript; charset=utf-8",
    "job.js": "text/javascript; charset=utf-8",
}
FONT_NAME = "noto-sans-cjk.ttc"  # Chromium draws a collection's first face (the browser test checks)

# Where sign-in may send the browser back to: a path on this site in printable ASCII (what the
# redirect below writes). Browsers drop tabs and newlines from a URL, so "/\t/evil" would be "//evil".
SAFE_NEXT = re.compile(r"/(?![/\\])[\x21-\x7e]*")

templates = Jinja2Templates(env=jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
    undefined=jinja2.StrictUndefined))

router = APIRouter(include_in_schema=False)


def _page(request: Request, name: str, **context) -> Response:
    """A page for a signed-in user; without a session cookie, the sign-in page first.

    The cookie's validity is the API's to judge: a page whose API calls answer 401 sends the
    browser to the sign-in page too (``static/anim.js``).
    """
    if SESSION_COOKIE not in request.cookies:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?{urlencode({'next': here})}", status_code=303)
    return templates.TemplateResponse(request, name, {"csrf_header": CSRF_HEADER, **context})


@router.get("/")
def home() -> Response:
    return RedirectResponse("/jobs", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login(request: Request, next: str = "/jobs") -> Response:
    # Only a path on this site: an absolute or scheme-relative URL would be an open redirect.
    safe_next = next if SAFE_NEXT.fullmatch(next) else "/jobs"
    return templates.TemplateResponse(request, "login.html",
                                      {"next": safe_next, "csrf_header": CSRF_HEADER})


@router.get("/jobs", response_class=HTMLResponse)
def jobs(request: Request, series: str = "", status: str = "", producer: str = "") -> Response:
    return _page(request, "jobs.html", series=series, status=status, producer=producer,
                 statuses=STATUSES)


@router.get("/jobs/new", response_class=HTMLResponse)
def new_job(request: Request) -> Response:
    return _page(request, "new.html", profiles=builtin_profiles(), aspects=ASPECTS)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job(request: Request, job_id: str) -> Response:
    return _page(request, "job.html", job_id=job_id)


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name == FONT_NAME:
        return FileResponse(font_path(), media_type="font/collection",
                            headers={"Cache-Control": "public, max-age=86400"})
    if name not in STATIC:
        return Response("not found", status_code=404, media_type="text/plain")
    return FileResponse(HERE / "static" / name, media_type=STATIC[name],
                        headers={"Cache-Control": "no-cache"})
