"""The producers' web page (pipeline/service/web.py), in a real browser and over real HTTP.

The browser is Debian's ``chromium`` driven by Playwright (which cannot download its own browsers
here); ``make setup-test`` installs it, and a machine without it fails these tests with that
message rather than skipping them.
"""
from __future__ import annotations

import shutil

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pipeline.service import web
from stages.draw import font_path


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("Debian's chromium is not installed, and the browser test needs it: run `make setup-test` "
                    "(apt-get install chromium)", pytrace=False)
    return path


def platform_fonts(page, selector: str) -> list[dict]:
    """The fonts Chromium actually drew ``selector``'s text with (DevTools' CSS.getPlatformFontsForNode)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    root = cdp.send("DOM.getDocument")["root"]["nodeId"]
    node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
    fonts = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
    cdp.detach()
    return fonts


def text_width_em(page, selector: str) -> float:
    """How wide ``selector``'s text is drawn, in ems of its font size (a CJK glyph is 1 em; tofu is not)."""
    return page.evaluate("""sel => {
        const el = document.querySelector(sel), r = document.createRange();
        r.selectNodeContents(el);
        return r.getBoundingClientRect().width / parseFloat(getComputedStyle(el).fontSize);
    }""", selector)


# --------------------------------------------------------------------------- the router over HTTP


@pytest.fixture()
def pages():
    app = FastAPI()
    app.include_router(web.router)
    with TestClient(app) as client:
        yield client


def test_pages_send_a_browser_without_a_session_to_sign_in(pages):
    r = pages.get("/jobs?series=s1", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=%2Fjobs%3Fseries%3Ds1"
    for path in ("/jobs/new", "/jobs/7"):
        assert pages.get(path, follow_redirects=False).headers["location"].startswith("/login?next=")
    assert pages.get("/", follow_redirects=False).headers["location"] == "/jobs"


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "jobs"])
def test_sign_in_goes_back_only_to_a_page_of_this_site(pages, target):
    html = pages.get("/login", params={"next": target}).text
    assert 'data-next="/jobs"' in html


def test_user_text_in_a_page_is_escaped(pages):
    pages.cookies.set(web.SESSION_COOKIE, "any")  # the page shell only; the API judges the cookie
    html = pages.get("/jobs", params={"series": '"><script>alert(1)</script>', "producer": "<b>mei</b>"}).text
    assert "<script>alert(1)" not in html and "<b>mei</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;mei&lt;/b&gt;" in html


def test_static_serves_only_its_own_files_and_the_cjk_font(pages):
    assert pages.get("/static/anim.css").headers["content-type"].startswith("text/css")
    font = pages.get(f"/static/{web.FONT_NAME}")
    assert font.status_code == 200 and font.content == font_path().read_bytes()
    assert font.content[:4] == b"ttcf"  # a TrueType collection: Chromium draws its first face
    for path in ("/static/web.py", "/static/..%2Fweb.py", "/static/anim.CSS", "/static/"):
        assert pages.get(path).status_code == 404, path
