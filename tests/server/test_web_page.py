"""The web chat page (`pixtral serve` at /), end to end: a live `pixtral serve` on the default model,
driven by a real headless chromium (Debian's package) through Playwright.

What is checked: the answer streamed into the page equals the API's greedy answer for the very
request the page sent; several images per message, attached by file picker, drop and paste,
resized in the browser to the model's size; multi-turn, regenerate, edit-and-resend, conversations
surviving a reload; Stop frees the request on the server (/metrics); an image over the server's
pixel limit shows the server's own message; model output holding HTML is shown as text; the
phone-sized layout; --api-key asked once; the Content-Security-Policy on every page response (and no
violation of it in the browser); `pixtral chat --web`.

Screenshots of the main states go to $PIXTRAL_TEST_ARTIFACTS/web-page (default:
out/test-artifacts/web-page in the repository). Without chromium or Playwright the browser tests
are skipped, except in CI (the CI variable set), where they fail saying what is missing.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import httpx
import pytest
from live_server import metrics, serve_process, wait_healthy
from PIL import Image

from pixtral.server.web import CSP

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "examples" / "chart.png"
QUESTION = "What is the value of bar G?"  # the README's question about examples/chart.png
PIXEL_LIMIT = 1_000_000  # the test server's --max-image-pixels: far above the model's 256 x 256
MODEL = "default_model"  # the served name of the embedded default model (its folder's name)
DESKTOP = {"width": 1000, "height": 700}


# ---------------------------------------------------------------------- servers
@contextmanager
def pixtral_serve(*options: str):
    """`pixtral serve` on the default model (no --model), as a process; yields its URL."""
    with serve_process(*options) as (url, _):
        yield url


@pytest.fixture(scope="module")
def url():
    with pixtral_serve("--max-image-pixels", str(PIXEL_LIMIT)) as url:
        yield url


# ---------------------------------------------------------------------- browser
def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; the web page's browser tests must run in CI (scripts/setup.sh installs both)",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright for Python is not installed (pip install -e '.[test]')")
    executable = os.environ.get("PIXTRAL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not executable:
        _unavailable("no chromium on this machine (apt-get install chromium, or bash scripts/setup.sh)")
    with sync_playwright() as p:
        # Playwright's own browser downloads are not used: the system's chromium, headless.
        browser = p.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def artifacts():
    folder = Path(os.environ.get("PIXTRAL_TEST_ARTIFACTS") or ROOT / "out" / "test-artifacts") / "web-page"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nweb page screenshots: {folder}")
    return folder


class Page:
    """A fresh browser context (empty local storage) on the page, recording what must not happen:
    uncaught errors in the page, Content-Security-Policy violations, requests to any other origin."""

    def __init__(self, browser, url: str, artifacts: Path, **context_options):
        self.context = browser.new_context(**{"viewport": DESKTOP, **context_options})
        self.page = self.context.new_page()
        self.url, self.artifacts, self.problems = url, artifacts, []
        self.page.on("pageerror", lambda exc: self.problems.append(f"uncaught error in the page: {exc}"))
        self.page.on("console", self._console)
        self.page.on("request", self._request)
        self.page.set_default_timeout(20_000)

    def _console(self, message):
        if "Content Security Policy" in message.text:
            self.problems.append(f"CSP violation: {message.text}")

    def _request(self, request):
        if not request.url.startswith((self.url + "/", "data:", "blob:")):
            self.problems.append(f"request to another origin: {request.url}")

    def open(self):
        self.page.goto(self.url + "/")
        self.wait_connected()
        return self.page

    def wait_connected(self):
        # Arrow functions only: a bare expression would be evaluated with eval, which the page's CSP forbids.
        self.page.wait_for_function("() => document.getElementById('model-name').textContent.length > 0")

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / name
        self.page.screenshot(path=str(path))
        return path

    def close(self):
        self.context.close()
        assert not self.problems, self.problems


@pytest.fixture
def web(browser, url, artifacts):
    page = Page(browser, url, artifacts)
    yield page
    page.close()


# ---------------------------------------------------------------------- page helpers
def settings(page, *, temperature=None, max_tokens=None, resize=None, extra=None, system=None, screenshot=None):
    page.click("#open-settings")
    if temperature is not None:
        page.fill("#set-temperature", str(temperature))
    if max_tokens is not None:
        page.fill("#set-max-tokens", str(max_tokens))
    if resize is not None:
        page.set_checked("#set-resize", resize)
    if extra is not None:
        page.fill("#set-extra", extra)
    if system is not None:
        page.fill("#set-system", system)
    if screenshot:
        page.screenshot(path=str(screenshot))
    page.click("#settings-save")
    page.wait_for_selector("#settings", state="hidden")


def send(page, text: str | None = None, action=None) -> dict:
    """Type `text` (if given), send with Enter (or `action`), wait for the answer; the request's body."""
    if text is not None:
        page.fill("#prompt", text)
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
        action() if action else page.press("#prompt", "Enter")
    page.wait_for_selector("#stop", state="hidden")  # the answer is complete (or failed)
    return request.value.post_data_json


def api_answer(url: str, body: dict) -> str:
    """The API's answer to the same request, not streamed."""
    same = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    response = httpx.post(f"{url}/v1/chat/completions", json=same, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def stored_conversation(page) -> list[dict]:
    """The current conversation as the page keeps it in local storage."""
    return page.evaluate("""() => {
        const id = JSON.parse(localStorage.getItem('pixtral.current'));
        return JSON.parse(localStorage.getItem('pixtral.conversations')).find(c => c.id === id).messages;
    }""")


def last_answer(page) -> str:
    return page.locator(".msg.assistant .markdown").last.inner_text()


def image_parts(body: dict) -> list[Image.Image]:
    images = []
    for message in body["messages"]:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    header, _, data = part["image_url"]["url"].partition(",")
                    assert header.startswith("data:image/") and header.endswith(";base64"), header
                    images.append(Image.open(io.BytesIO(base64.b64decode(data))))
    return images


def js_file(path: Path, name: str, type_: str = "image/png") -> str:
    """JavaScript that builds a DataTransfer holding the file, as `dt`."""
    data = base64.b64encode(path.read_bytes()).decode()
    return (f"const dt = new DataTransfer(); dt.items.add(new File([Uint8Array.from(atob('{data}'), "
            f"c => c.charCodeAt(0))], {json.dumps(name)}, {{type: {json.dumps(type_)}}}));")


def drop(page, path: Path, name: str):
    page.evaluate("() => {" + js_file(path, name) + """
        const target = document.getElementById('messages');
        target.dispatchEvent(new DragEvent('dragenter', {dataTransfer: dt, bubbles: true}));
        target.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""")


def paste(page, path: Path, name: str):
    page.evaluate("() => {" + js_file(path, name) + """
        document.getElementById('prompt').dispatchEvent(
            new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}));
    }""")


def wait_attachments(page, n: int):
    page.wait_for_function(f"""() => {{
        const captions = [...document.querySelectorAll('#attachments figcaption')];
        return captions.length === {n} && captions.every(c => c.textContent !== '\u2026');
    }}""")


# ---------------------------------------------------------------------- tests
def test_page_files_and_security_headers(url):
    with httpx.Client(base_url=url) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        # The page is exactly the file shipped in the package, found through importlib.resources.
        static = resources.files("pixtral.server.web") / "static"
        assert page.content == (static / "index.html").read_bytes()
        # No inline script or style, which the policy forbids: every script and sheet is a file.
        assert "<style" not in html and " style=" not in html and "javascript:" not in html
        assert html.count("<script") == html.count('<script type="module" src="/web/') == 1
        for name, media in [("", "text/html"), ("web/app.js", "text/javascript"), ("web/markdown.js", "text/javascript"),
                            ("web/api.js", "text/javascript"), ("web/images.js", "text/javascript"),
                            ("web/style.css", "text/css"), ("web/icon.svg", "image/svg+xml")]:
            response = http.get("/" + name)
            assert response.status_code == 200, name
            assert response.headers["content-security-policy"] == CSP, name
            assert response.headers["content-type"].startswith(media), name
            assert response.headers["x-content-type-options"] == "nosniff"
        assert CSP.startswith("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                              "connect-src 'self'")
        assert http.head("/").status_code == 200
        # Only the shipped files: nothing else is reachable under /web/.
        for name in ("nope.js", "__init__.py", "..%2F__init__.py", "static"):
            assert http.get(f"/web/{name}").status_code == 404, name
        config = http.get("/web/config.json").json()
        assert config == {"model": MODEL, "max_model_len": 4096, "max_image_size": 256, "max_image_pixels": PIXEL_LIMIT,
                          "max_image_bytes": 20 * 2**20, "max_images_per_request": 64}


def test_page_off_with_no_web():
    """--no-web (ServerConfig.web_page=False): no page, the API untouched."""
    from fastapi.testclient import TestClient

    from pixtral.server import ServerConfig, ServerState, build_app

    with TestClient(build_app(ServerState(), ServerConfig(web_page=False))) as http:
        assert http.get("/").status_code == 404
        assert http.get("/web/app.js").status_code == 404
        assert http.get("/v1/models").status_code == 200
    with TestClient(build_app(ServerState(), ServerConfig())) as http:
        assert http.get("/").status_code == 200
        # The page's config needs the model: 503 while it loads (the page shows "loading" and retries).
        assert http.get("/web/config.json").json()["error"]["code"] == "model_loading"


def test_chart_question_streams_the_greedy_answer(web, url):
    page = web.open()
    settings(page, temperature=0, max_tokens=64)
    # Three images three ways (file picker, drop, paste), previewed; two removed before sending.
    page.set_input_files("#file-input", str(CHART))
    drop(page, ROOT / "examples" / "scene.png", "scene.png")
    paste(page, ROOT / "examples" / "table.png", "table.png")
    wait_attachments(page, 3)
    captions = page.locator("#attachments figcaption").all_inner_texts()
    assert captions[0] == "397\u00d7347 \u2192 256\u00d7224", captions  # resized to the model's 256 px
    page.click("#attachments [aria-label='Remove scene.png']")
    page.click("#attachments [aria-label='Remove table.png']")
    wait_attachments(page, 1)

    body = send(page, QUESTION)
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 64
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert body["messages"][0]["content"][-1] == {"type": "text", "text": QUESTION}
    [image] = image_parts(body)
    assert image.size == (256, 224)  # longest side the model's maximum: what the upload carries
    expected = api_answer(url, body)
    assert expected.strip(), "the API gave an empty answer"
    assert stored_conversation(page)[-1]["text"] == expected  # every streamed piece, in order
    assert last_answer(page) == expected.strip()
    stats = page.inner_text("#stats")
    assert re.match(r"Last answer: \d+ tokens in \d+\.\d\d s .* prompt 76 tokens \(63 for images\)$", stats), stats
    web.screenshot("chat-answer.png")

    # A second turn carries the first (with its image and answer).
    follow_up = send(page, "What is the value of bar E?")
    assert [m["role"] for m in follow_up["messages"]] == ["user", "assistant", "user"]
    assert follow_up["messages"][1]["content"] == expected
    assert stored_conversation(page)[-1]["text"] == api_answer(url, follow_up)

    # Regenerate: the same request again, the same greedy answer in place of the last one.
    again = send(page, action=lambda: page.locator(".msg.assistant .regenerate").last.click())
    assert again == follow_up
    assert len(stored_conversation(page)) == 4

    # Edit the first question and send it again: what followed it goes.
    page.locator(".msg.user .edit").first.click()
    page.fill(".edit-text", "What is the value of bar E?")
    edited = send(page, action=lambda: page.click(".save-edit"))
    assert [m["role"] for m in edited["messages"]] == ["user"] and len(image_parts(edited)) == 1
    assert edited["messages"][0]["content"][-1]["text"] == "What is the value of bar E?"
    conversation = stored_conversation(page)
    assert [m["role"] for m in conversation] == ["user", "assistant"]
    assert conversation[-1]["text"] == api_answer(url, edited)

    # Kept in local storage: a reload shows the same conversation.
    page.reload()
    web.wait_connected()
    assert page.locator(".msg").count() == 2
    assert page.locator(".msg.user img").count() == 1
    assert page.locator("#conversations li").count() == 1
    web.screenshot("chat-after-reload.png")


def test_several_images_in_one_message(web, url):
    page = web.open()
    settings(page, temperature=0, max_tokens=32, system="Answer briefly.", screenshot=web.artifacts / "settings.png")
    drop(page, ROOT / "examples" / "scene.png", "scene.png")
    paste(page, ROOT / "examples" / "table.png", "table.png")
    wait_attachments(page, 2)
    web.screenshot("attachments.png")
    # Shift+Enter starts a new line; Enter sends.
    page.click("#prompt")
    page.keyboard.type("What is in")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("these two images?")
    assert page.input_value("#prompt") == "What is in\nthese two images?"
    assert page.locator(".msg").count() == 0
    body = send(page)
    assert body["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert body["messages"][1]["content"][-1]["text"] == "What is in\nthese two images?"
    sizes = [im.size for im in image_parts(body)]
    assert sizes == [(256, 159), (256, 223)], sizes  # both scaled to the model's 256 px (295x183, 329x287)
    assert stored_conversation(page)[-1]["text"] == api_answer(url, body)
    assert page.locator(".msg.user img").count() == 2


def test_stop_frees_the_request_on_the_server(web, url):
    page = web.open()
    # ignore_eos through the settings' extra parameters: the small model would otherwise stop at once.
    settings(page, temperature=0, max_tokens=4000, extra='{"ignore_eos": true}')
    page.fill("#prompt", "Write a long story.")
    page.press("#prompt", "Enter")
    page.wait_for_function("() => (document.querySelector('.msg.assistant.streaming .markdown')?.textContent.length ?? 0) > 20")
    before = metrics(url)
    assert before["pixtral_num_requests_running"] == 1, "the answer should be running on the server"
    web.screenshot("streaming.png")
    page.click("#stop")
    deadline = time.monotonic() + 5
    while True:
        now = metrics(url)
        if now["pixtral_num_requests_running"] == 0 and now["pixtral_num_requests_waiting"] == 0:
            break
        assert time.monotonic() < deadline, f"the server still runs the request 5 s after Stop: {now}"
        time.sleep(0.05)
    aborted = 'pixtral_request_success_total{finished_reason="abort"}'
    assert now[aborted] == before[aborted] + 1
    assert now["pixtral_kv_blocks_used"] == 0
    time.sleep(0.5)
    assert metrics(url)["pixtral_generation_tokens_total"] == now["pixtral_generation_tokens_total"]
    page.wait_for_selector(".msg.assistant .msg-note:has-text('Stopped.')")
    assert page.is_visible("#send") and not page.is_visible("#stop")
    partial = stored_conversation(page)[-1]
    assert partial["stopped"] and 0 < len(partial["text"])
    web.screenshot("stopped.png")


def test_image_over_the_limit_shows_the_servers_message(web, url, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (2000, 1000), "white").save(big)  # 2 megapixels; the server takes 1
    page = web.open()
    settings(page, resize=False)  # send it as it is
    page.set_input_files("#file-input", str(big))
    wait_attachments(page, 1)
    body = send(page, "What is in this image?")
    assert [im.size for im in image_parts(body)] == [(2000, 1000)]
    refused = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=60)
    assert refused.status_code == 413
    message = refused.json()["error"]["message"]
    assert "over the limit of 1.0 megapixels" in message
    error = page.locator(".msg.error").inner_text()
    assert message in error and error.startswith("The server refused an image:"), error
    assert page.locator(".msg.assistant").count() == 0
    web.screenshot("image-refused.png")

    # Resized in the browser (the default), the same image goes through.
    page.click("#new-chat")
    settings(page, resize=True)
    page.set_input_files("#file-input", str(big))
    wait_attachments(page, 1)
    body = send(page, "What is in this image?")
    assert [im.size for im in image_parts(body)] == [(256, 128)]
    assert page.locator(".msg.error").count() == 0 and page.locator(".msg.assistant").count() == 1


HOSTILE = ("Here is <script>window.__pwned = 1</script> and <img src=x onerror=\"window.__pwned = 2\">, "
           "a [link](javascript:window.__pwned=3), a [real one](https://example.com/docs) and **bold**, *italic*, "
           "`<b>code</b>`.\n\n```html\n<script>window.__pwned = 4</script>\n```\n\n- one <iframe src=x></iframe>\n- two")


def test_model_output_is_shown_as_text(web, url):
    """Model output holding HTML, rendered by the same Markdown renderer the stream uses: from a
    conversation kept in local storage (the default model never writes HTML), and a user's typed
    HTML sent through the server."""
    page = web.open()
    conversation = [{"id": "c1", "title": "hostile", "updated": 1, "messages": [
        {"role": "user", "text": "Say something", "images": []},
        {"role": "assistant", "text": HOSTILE, "images": []},
    ]}]
    page.evaluate("c => { localStorage.setItem('pixtral.conversations', JSON.stringify(c)); "
                  "localStorage.setItem('pixtral.current', JSON.stringify('c1')); }", conversation)
    page.reload()
    web.wait_connected()
    answer = page.locator(".msg.assistant .markdown")
    text = answer.inner_text()
    for shown in ("<script>window.__pwned = 1</script>", "<img src=x onerror=\"window.__pwned = 2\">",
                  "[link](javascript:window.__pwned=3)", "<b>code</b>", "<script>window.__pwned = 4</script>",
                  "<iframe src=x></iframe>"):
        assert shown in text, (shown, text)
    assert answer.locator("script, img, iframe, b").count() == 0
    assert answer.locator("strong").inner_text() == "bold" and answer.locator("em").inner_text() == "italic"
    assert answer.locator("pre code").inner_text() == "<script>window.__pwned = 4</script>"
    [link] = answer.locator("a").all()
    assert link.get_attribute("href") == "https://example.com/docs"
    assert link.get_attribute("rel") == "noopener noreferrer"
    assert answer.locator("li").count() == 2

    # A question typed as HTML goes to the server and comes back into the page as text.
    body = send(page, "<img src=y onerror=\"window.__pwned = 5\"> what is <b>this</b>?")
    assert body["messages"][-1]["content"].startswith("<img src=y")
    assert "<img src=y" in page.locator(".msg.user .user-text").last.inner_text()
    assert page.locator("#messages img").count() == 0
    time.sleep(0.3)  # an onerror handler would have run by now
    assert page.evaluate("window.__pwned") is None
    web.screenshot("html-as-text.png")


MARKDOWN_CASES = [
    # (markdown, the HTML the renderer builds)
    ("plain *it* **bold** __b__ _i_ snake_case_name a__b__c", "<p>plain <em>it</em> <strong>bold</strong> "
     "<strong>b</strong> <em>i</em> snake_case_name a__b__c</p>"),
    ("line one\nline two\n\nnext", "<p>line one<br>line two</p><p>next</p>"),
    ("`a <b>` and ``x ` y``", "<p><code>a &lt;b&gt;</code> and <code>x ` y</code></p>"),
    ("# Title\n- a\n- b\n\n3. c\n4. d", "<h3>Title</h3><ul><li>a</li><li>b</li></ul><ol start=\"3\"><li>c</li>"
     "<li>d</li></ol>"),
    ("> quoted **x**", "<blockquote><p>quoted <strong>x</strong></p></blockquote>"),
    ("```py\nx = '<i>'\n```", "<div class=\"code-block\"><button class=\"copy-code\" type=\"button\" "
     "title=\"Copy the code\">Copy</button><pre><code data-lang=\"py\">x = '&lt;i&gt;'</code></pre></div>"),
    ("```\nstill streaming", "<div class=\"code-block\"><button class=\"copy-code\" type=\"button\" "
     "title=\"Copy the code\">Copy</button><pre><code>still streaming</code></pre></div>"),
    ("[a](https://x.org/p?q=1) [b](javascript:alert(1)) [c](data:text/html,hi) see http://y.org/z.",
     "<p><a href=\"https://x.org/p?q=1\" target=\"_blank\" rel=\"noopener noreferrer\">a</a> "
     "[b](javascript:alert(1)) [c](data:text/html,hi) see <a href=\"http://y.org/z\" target=\"_blank\" "
     "rel=\"noopener noreferrer\">http://y.org/z</a>.</p>"),
    ("<p onclick=x>&amp;</p>", "<p>&lt;p onclick=x&gt;&amp;amp;&lt;/p&gt;</p>"),
]


def test_markdown_renderer(web):
    """The renderer the page uses for every answer, on each construct it knows and on hostile input."""
    page = web.open()
    rendered = page.evaluate("""async (cases) => {
        const {renderMarkdown} = await import('/web/markdown.js');
        return cases.map((text) => {
            const box = document.createElement('div');
            box.append(renderMarkdown(text));
            return box.innerHTML;
        });
    }""", [markdown for markdown, _ in MARKDOWN_CASES])
    for (markdown, expected), html in zip(MARKDOWN_CASES, rendered):
        assert html == expected, markdown


def test_phone_sized_screen(browser, url, artifacts):
    phone = Page(browser, url, artifacts, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                 device_scale_factor=2)
    try:
        page = phone.open()
        page.set_input_files("#file-input", str(CHART))
        wait_attachments(phone.page, 1)
        send(page, QUESTION)
        assert page.locator(".msg.assistant").count() == 1
        # Nothing wider than the screen; the composer and Send within it; the list behind a button.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        for selector in ("#prompt", "#send", "#attach", "#open-settings"):
            box = page.locator(selector).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844, selector
        assert not page.locator("#new-chat").is_visible() or page.locator("#new-chat").bounding_box()["x"] < 0
        phone.screenshot("phone.png")
        page.click("#toggle-sidebar")
        page.wait_for_function("() => document.getElementById('new-chat').getBoundingClientRect().x >= 0")
        phone.screenshot("phone-conversations.png")
    finally:
        phone.close()


def test_api_key_is_asked_once(browser, artifacts):
    with pixtral_serve("--api-key", "sesame-123") as url:
        assert httpx.get(f"{url}/web/config.json").status_code == 401
        web = Page(browser, url, artifacts)
        try:
            page = web.page
            page.goto(url + "/")
            page.wait_for_selector("#key-dialog[open]")
            page.fill("#key-input", "wrong")
            page.click("#key-save")
            page.wait_for_selector("#key-error:has-text('refused')")
            web.screenshot("api-key.png")
            page.fill("#key-input", "sesame-123")
            page.click("#key-save")
            web.wait_connected()
            assert not page.is_visible("#key-dialog")
            body = send(page, "Hello")
            assert page.locator(".msg.error").count() == 0
            assert stored_conversation(page)[-1]["text"] == httpx.post(
                f"{url}/v1/chat/completions", json={**body, "stream": False},
                headers={"Authorization": "Bearer sesame-123"}).json()["choices"][0]["message"]["content"]
            page.reload()  # the key is kept: no second question
            web.wait_connected()
            assert not page.is_visible("#key-dialog")
        finally:
            web.close()


def test_chat_web_opens_the_page():
    """`pixtral chat --web`: a server on a free port, the URL printed and handed to the browser ($BROWSER)."""
    env = {**os.environ, "BROWSER": "echo opened %s"}  # webbrowser runs $BROWSER: here it only prints
    proc = subprocess.Popen([sys.executable, "-m", "pixtral.cli.main", "chat", "--web"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in proc.stdout], daemon=True).start()
    try:
        seen = []
        while not any(line.startswith("opened ") for line in seen):
            try:
                seen.append(lines.get(timeout=60))
            except queue.Empty:
                raise AssertionError(f"pixtral chat --web printed no page within 60 s: {seen}") from None
        page_url = next(line for line in seen if line.startswith("chat page: ")).removeprefix("chat page: ")
        assert f"opened {page_url}" in seen and page_url.startswith("http://127.0.0.1:")
        response = httpx.get(page_url)
        assert response.status_code == 200 and response.headers["content-security-policy"] == CSP
        assert wait_healthy(page_url.rstrip("/"), proc)
    finally:
        proc.terminate()
        proc.wait(20)
