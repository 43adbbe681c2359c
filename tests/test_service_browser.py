"""The producers' web page (pipeline/service/web.py), in a real browser and over real HTTP.

The browser is Debian's ``chromium`` driven by Playwright (which cannot download its own browsers
here); ``make setup-test`` installs it, and a machine without it fails these tests with that
message rather than skipping them.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pipeline.service import web
from stages.draw import font_path

REPO = Path(__file__).resolve().parents[1]
TITLE = "海边的少女"
SERIES = "夏天 <b>第一季</b>"  # Chinese, and markup that must show as text
SCRIPT = f"""title: {TITLE}
characters: [MEI]
scenes:
  - heading: EXT. BEACH - DUSK
    location: BEACH
    time_of_day: DUSK
    shots:
      - {{duration: 1.0, camera: wide, characters: [MEI], action: 美在海边散步。}}
      - {{duration: 1.0, camera: close-up, characters: [MEI], action: Mei smiles at the sea.}}
"""
SHOTS, FRAMES = 2, 48  # two 1-s shots at the draft profile's 24 fps
# Test instrumentation, run in every page before its own scripts: what #job-status and #shots
# showed, in order, so the test can tell the page updated itself while the job ran.
SEEN = """
window.__seen = {status: [], shots: []};
document.addEventListener("DOMContentLoaded", () => {
  for (const [id, key] of [["job-status", "status"], ["shots", "shots"]]) {
    const el = document.getElementById(id);
    if (!el) continue;
    new MutationObserver(() => {
      const seen = window.__seen[key], text = el.textContent;
      if (text && seen[seen.length - 1] !== text) seen.push(text);
    }).observe(el, {childList: true, characterData: true, subtree: true});
  }
});
"""


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


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "jobs",
                                    "/\t/evil.example", "/\n/evil.example", "/ /x"])
def test_sign_in_goes_back_only_to_a_page_of_this_site(pages, target):
    html = pages.get("/login", params={"next": target}).text
    assert 'data-next="/jobs"' in html


def test_sign_in_goes_back_to_the_page_that_sent_the_browser(pages):
    there = pages.get("/jobs?series=s1", follow_redirects=False).headers["location"]
    assert 'data-next="/jobs?series=s1"' in pages.get(there).text


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


# --------------------------------------------------------------------------- the page in a browser


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The real service (`anim serve`) on a free loopback port, its own Ray head, SQLite job
    table, MLflow file and store under a temp folder, and one producer with a password."""
    from pipeline.service.cluster import local_endpoint, stop_local_head

    root = tmp_path_factory.mktemp("web")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ANIM_SERVER", "ANIM_TOKEN", "ANIM_CONFIG")}
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "ANIM_STORE": str(root / "store"),
                "ANIM_APPROVALS": str(root / "approvals.db"), "ANIM_SERVICE_DATA": str(root / "data"),
                "XDG_DATA_HOME": str(root / "xdg"), "XDG_CONFIG_HOME": str(root / "xdg-config"),
                "MLFLOW_DISABLE_TELEMETRY": "true"})
    endpoint = local_endpoint(root / "data", num_cpus=2)  # the service finds this head and reuses it
    proc = None
    log_path = root / "serve.log"
    try:
        added = subprocess.run([sys.executable, "-m", "pipeline", "users", "add", "mei", "--password", "mei-secret"],
                               cwd=REPO, env=env, capture_output=True, text=True)
        assert added.returncode == 0, added.stderr
        port = _free_port()
        with log_path.open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--port", str(port)], cwd=REPO,
                                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "anim serve exited:\n" + log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/api/me", timeout=2).status_code == 401:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("anim serve did not answer:\n" + log_path.read_text()[-3000:])
            time.sleep(0.3)
        script = root / "海边.yaml"
        script.write_text(SCRIPT, encoding="utf-8")
        bad = root / "broken.yaml"
        bad.write_text("title: x\nscenes:\n  - heading: EXT. A - DAY\n    shots: [{duration: -1}]\n", encoding="utf-8")
        yield {"url": url, "root": root, "script": script, "bad": bad, "log": log_path}
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        stop_local_head(endpoint)


@pytest.fixture(scope="module")
def chromium_path() -> str:
    return chromium()


@pytest.fixture()
def page(chromium_path, service, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path)
        context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
        context.add_init_script(SEEN)
        tab = context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            yield tab
        finally:
            shot = tmp_path / "last-page.png"
            try:
                tab.screenshot(path=str(shot), full_page=True)
            except Exception:  # noqa: BLE001 - a screenshot is only for the failure's reader
                pass
            browser.close()
        assert not errors, f"the page's scripts threw: {errors}"


def _seen(page, key: str) -> list[str]:
    return page.evaluate(f"window.__seen[{key!r}]")


def test_a_producer_signs_in_submits_approves_watches_and_downloads(chromium_path, service, page, tmp_path):
    from playwright.sync_api import expect

    url = service["url"]
    expect.set_options(timeout=30_000)  # a busy 2-core machine: the plan alone can take seconds
    try:
        # 1. Sign in: a page without a session goes to the sign-in form and back.
        page.goto(url + "/jobs/new")
        expect(page).to_have_url(re.compile(r"/login\?next=%2Fjobs%2Fnew$"))
        page.fill("input[name=username]", "mei")
        page.fill("input[name=password]", "wrong")
        page.click("#login button[type=submit]")
        expect(page.locator("#login-error")).to_have_text("Wrong user name or password.")
        page.fill("input[name=password]", "mei-secret")
        page.click("#login button[type=submit]")
        expect(page).to_have_url(url + "/jobs/new")
        expect(page.locator("#me")).to_have_text("mei")

        # 2. A bad script is refused at upload with the CLI's one line; nothing can be submitted.
        page.set_input_files("#script", str(service["bad"]))
        expect(page.locator("#new-error")).to_contain_text("broken.yaml")
        expect(page.locator("#submit-btn")).to_be_disabled()

        # 3. The script, the profile, a budget: the plan's estimate before submitting.
        page.set_input_files("#script", str(service["script"]))
        page.select_option("#profile", "draft")
        page.fill("#budget", "5")
        page.fill("#series", SERIES)
        page.click("#estimate-btn")
        expect(page.locator("#est-shots")).to_have_text(str(SHOTS))
        expect(page.locator("#est-yuan")).to_have_text(re.compile(r"^¥\d"))
        expect(page.locator("#est-budget")).to_have_text("Within the budget of ¥5.00.")
        expect(page.locator("#submit-btn")).to_be_enabled()
        expect(page.locator("#approval-gate")).to_be_checked()
        page.click("#submit-btn")
        expect(page).to_have_url(re.compile(r"/jobs/\d+$"))
        job_id = page.url.rsplit("/", 1)[1]

        # 4. The storyboard is drawn first; each panel approved with a comment.
        expect(page.locator("#job-status")).to_have_text("awaiting approval", timeout=120_000)
        panels = page.locator("#panels .panel")
        expect(panels).to_have_count(SHOTS)
        for i in range(SHOTS):
            panel = panels.nth(i)
            expect(panel.locator("img")).to_have_js_property("complete", True)
            assert panel.locator("img").evaluate("img => img.naturalWidth") > 0, "a panel image did not load"
            panel.locator(".comment").fill(f"好，第{i + 1}镜通过")
            panel.locator(".approve").click()
            expect(panels.nth(i)).to_have_class(re.compile(r"\bapproved\b"))
            expect(panels.nth(i).locator(".decision")).to_contain_text("approved by mei")

        # 5. Progress and cost, live, to the end; the log tail; the MLflow-tracked cost.
        expect(page.locator("#job-status")).to_have_text("succeeded", timeout=180_000)
        expect(page.locator("#shots")).to_have_text(f"{SHOTS} / {SHOTS}")
        # The page was never reloaded: it showed each state as the job went through it.
        statuses = _seen(page, "status")
        after = statuses[statuses.index("awaiting approval"):]
        assert "rendering" in after and after[-1] == "succeeded", statuses
        done = [int(t.split("/")[0]) for t in _seen(page, "shots") if "/" in t]
        assert done == sorted(done) and done[-1] == SHOTS, _seen(page, "shots")
        spent = page.locator("#spent").text_content()
        assert re.fullmatch(r"¥\d+(\.\d+)?", spent) and float(spent[1:]) > 0, spent
        api_job = page.request.get(f"{url}/api/jobs/{job_id}").json()
        assert spent == page.evaluate("v => anim.yuan(v)", api_job["progress"]["spent_yuan"])
        expect(page.locator("#log")).not_to_be_empty()
        expect(page.locator("#cancel-btn")).to_be_hidden()

        # 6. Chinese text in the page's own font (Noto Sans CJK from /static), not tofu.
        expect(page.locator("#job-title")).to_have_text(TITLE)
        page.evaluate("document.fonts.ready")
        fonts = platform_fonts(page, "#job-title")
        assert fonts and all(f["isCustomFont"] and f["familyName"].startswith("Noto Sans CJK") for f in fonts), fonts
        assert abs(text_width_em(page, "#job-title") - len(TITLE)) < 0.05  # each glyph one em wide
        # The face's Chinese glyph forms (OpenType locl) follow the marked language, not its Japanese default.
        assert page.locator("#job-title").get_attribute("lang") == "zh-Hans"
        page.evaluate("""() => { for (const lang of ["ja", "zh-Hans"]) { const s = document.createElement("span");
            s.id = "locl-" + lang; s.lang = lang; s.style.fontSize = "64px"; s.textContent = "直骨";
            document.body.append(s); } }""")
        assert page.locator("#locl-ja").screenshot() != page.locator("#locl-zh-Hans").screenshot()
        page.evaluate("""() => { const s = document.createElement("span"); s.id = "control";
            s.style.fontFamily = "monospace"; s.textContent = "海边"; document.body.append(s); }""")
        assert not any(f["isCustomFont"] for f in platform_fonts(page, "#control"))  # the check can tell
        # ...and user text stays text: the series' markup is shown, never made into elements.
        expect(page.locator("#job-meta")).to_contain_text(SERIES)
        expect(page.locator("#job-meta b")).to_have_count(0)

        # 7. Download the episode from the page: a real video of the planned frames.
        with page.expect_download() as download:
            page.click("#files a[download='episode.mp4']")
        episode = tmp_path / "episode.mp4"
        download.value.save_as(episode)
        video = cv2.VideoCapture(str(episode))
        frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT))
        ok, frame = video.read()
        video.release()
        assert ok and frames == FRAMES and frame.shape[0] > 0, (frames, episode.stat().st_size)

        # 8. The job list, filtered by series and by status.
        page.goto(url + "/jobs?" + httpx.QueryParams({"series": SERIES}).__str__())
        row = page.locator(f"#jobs tbody tr[data-job-id='{job_id}']")
        expect(row).to_contain_text(TITLE)
        expect(row).to_contain_text("succeeded")
        page.goto(url + "/jobs?status=failed")
        expect(page.locator("#jobs-empty")).to_be_visible()
        expect(page.locator("#jobs tbody tr")).to_have_count(0)

        page.goto(url + "/jobs?producer=mei")
        expect(page.locator(f"#jobs tbody tr[data-job-id='{job_id}']")).to_be_visible()
        page.goto(url + "/jobs?producer=nobody")
        expect(page.locator("#jobs-empty")).to_be_visible()

        # 9. Sign out: the pages want a session again.
        page.click("#sign-out")
        expect(page).to_have_url(re.compile(r"/login"))
        page.goto(f"{url}/jobs/{job_id}")
        expect(page).to_have_url(re.compile(r"/login\?next="))
    except BaseException as exc:
        raise AssertionError(f"{exc}\n--- anim serve log (tail) ---\n{service['log'].read_text()[-4000:]}") from exc


def test_a_rejected_panel_stops_the_job_and_the_page_retries_and_cancels_it(chromium_path, service, page):
    from playwright.sync_api import expect

    url = service["url"]
    expect.set_options(timeout=30_000)
    # Other shots than the first test's: their panels have no decisions on record yet.
    script = SCRIPT.replace("美在海边散步。", "美在海边捡贝壳。").replace("smiles at the sea", "waves at a boat")
    try:
        page.goto(url + "/login")
        page.fill("input[name=username]", "mei")
        page.fill("input[name=password]", "mei-secret")
        page.click("#login button[type=submit]")
        expect(page).to_have_url(url + "/jobs")
        # Submitted over the API with the page's cookie and header (the first test submits through the form).
        r = page.request.post(url + "/api/jobs", headers={"X-Anim": "1"}, multipart={
            "script": {"name": "贝壳.yaml", "mimeType": "text/yaml", "buffer": script.encode()},
            "profile": "draft", "approval_gate": "true", "series": "贝壳"})
        assert r.status == 201, r.text()
        job_id = r.json()["id"]
        page.goto(f"{url}/jobs/{job_id}")
        expect(page.locator("#job-status")).to_have_text("awaiting approval", timeout=120_000)
        expect(page.locator("#cancel-btn")).to_be_visible()
        expect(page.locator("#retry-btn")).to_be_hidden()

        # 1. One panel rejected with a comment, the other approved: the job stops for approval.
        panels = page.locator("#panels .panel")
        expect(panels).to_have_count(SHOTS)
        panels.nth(0).locator(".comment").fill("太暗了，重画")
        panels.nth(0).locator(".reject").click()
        expect(panels.nth(0)).to_have_class(re.compile(r"\brejected\b"))
        panels.nth(1).locator(".approve").click()
        expect(page.locator("#job-status")).to_have_text("stopped")
        expect(page.locator("#job-stopped")).to_contain_text("approval")
        expect(panels.nth(0).locator(".comment")).to_have_value("太暗了，重画")
        expect(panels.nth(0).locator(".decision")).to_contain_text("rejected by mei")
        expect(page.locator("#cancel-btn")).to_be_hidden()

        # 2. Retry from the page: a new attempt, followed live again.
        attempt = int(page.locator("#attempt").text_content())
        page.click("#retry-btn")
        expect(page.locator("#job-status")).not_to_have_text("stopped")
        expect(page.locator("#attempt")).to_have_text(str(attempt + 1))
        expect(page.locator("#retry-btn")).to_be_hidden()

        # 3. Cancel from the page.
        page.click("#cancel-btn")
        expect(page.locator("#job-status")).to_have_text("cancelled")
        expect(page.locator("#retry-btn")).to_be_visible()
        assert page.request.get(f"{url}/api/jobs/{job_id}").json()["status"] == "cancelled"
    except BaseException as exc:
        raise AssertionError(f"{exc}\n--- anim serve log (tail) ---\n{service['log'].read_text()[-4000:]}") from exc
