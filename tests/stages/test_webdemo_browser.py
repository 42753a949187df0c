"""A real headless Chromium (Debian's ``chromium``) driven over the DevTools protocol, and the web demo in it.

``chromium --headless --dump-dom`` alone is not enough for Streamlit: the page is an empty shell until
its websocket session has run the script, and ``--virtual-time-budget`` does not wait for real
network. So the browser is driven over CDP (aiohttp websocket): open the page, wait until the app has
rendered, type into the chat box and press Enter, wait for the answer, then take the screenshot and
the rendered DOM. The fresh-host tests use the same :class:`Browser` through the SSH tunnel.

Artifacts go to ``tests/artifacts/`` (gitignored).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llama3_ops.lab.standin import free_port, wait_http_ok
from llama3_ops.remote.procs import stop_process
from llama3_ops.stages.webdemo import WEBDEMO_APP

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # root in a container: Chromium's sandbox needs user namespaces it cannot get
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--window-size=1280,900",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]


def chromium_exe() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests: apt-get install chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return exe


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[str]:
    """Start headless Chromium; yield its DevTools HTTP endpoint (``http://127.0.0.1:PORT``)."""
    proc = subprocess.Popen(
        [chromium_exe(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip())
            m = re.search(r"DevTools listening on ws://([\d.]+:\d+)/", line)
            if m:
                found.append(f"http://{m.group(1)}")
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(60) or not found:
            raise RuntimeError("chromium did not start:\n" + "\n".join(lines[-20:]))
        yield found[0]
    finally:
        stop_process(proc, timeout=10)


class Page:
    """One browser tab over the DevTools protocol."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._id = 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        mid = self._id
        await self.ws.send_json({"id": mid, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=120)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))

    async def eval(self, expression: str) -> Any:
        res = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression[:80]}: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = await self.eval("document.body ? document.body.innerText : ''")
                raise TimeoutError(f"{what}: not seen after {timeout:.0f}s; the page says:\n{str(text)[-1500:]}")
            await asyncio.sleep(0.5)

    async def text(self) -> str:
        return str(await self.eval("document.body.innerText"))

    async def screenshot(self, path: Path) -> bytes:
        res = await self.send("Page.captureScreenshot", format="png")
        data = base64.b64decode(res["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    async def dom(self, path: Path) -> str:
        html = str(await self.eval("document.documentElement.outerHTML"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(html)
        return html


@dataclass
class Visit:
    text: str  # the page's visible text at the end
    dom: str
    png: bytes
    messages: list[dict[str, str]]  # the chat messages on the page: role (user/assistant) and text


MESSAGES_JS = """
Array.from(document.querySelectorAll('[data-testid="stChatMessage"]')).map(m => ({
  role: ((m.querySelector('[data-testid^="stChatMessageAvatar"]') || {}).dataset?.testid || '')
    .replace('stChatMessageAvatar', '').toLowerCase(),
  text: (m.querySelector('[data-testid="stChatMessageContent"]') || {}).innerText || ''}))
"""
# Streamlit marks its root element with the script run's state (the header's running icon is hidden in
# the app's minimal toolbar mode).
IDLE_JS = "document.querySelector('[data-testid=\"stApp\"]')?.dataset.testScriptState === 'notRunning'"


async def _visit(devtools: str, url: str, name: str, ready_text: str, chat: str | None, timeout: float) -> Visit:
    import aiohttp

    with urllib.request.urlopen(f"{devtools}/json/version", timeout=10) as resp:
        browser_ws = json.load(resp)["webSocketDebuggerUrl"]
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(browser_ws, max_msg_size=0) as bws:
            browser = Page(bws)
            target = (await browser.send("Target.createTarget", url="about:blank"))["targetId"]
        page_ws = f"{devtools.replace('http://', 'ws://')}/devtools/page/{target}"
        async with session.ws_connect(page_ws, max_msg_size=0) as ws:
            page = Page(ws)
            await page.send("Page.enable")
            await page.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                            mobile=False)
            await page.send("Page.navigate", url=url)
            await page.wait_for(f"document.body && document.body.innerText.includes({json.dumps(ready_text)})",
                                timeout, f"{ready_text!r} on {url}")
            await page.wait_for(IDLE_JS, timeout, "the end of the first script run")
            if chat is not None:
                box = "document.querySelector('textarea[data-testid=\"stChatInputTextArea\"]')"
                await page.wait_for(f"!!{box}", timeout, "the chat box")
                await page.eval(f"{box}.focus()")
                await page.send("Input.insertText", text=chat)
                for kind in ("keyDown", "keyUp"):
                    await page.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                                    windowsVirtualKeyCode=13, nativeVirtualKeyCode=13,
                                    **({"text": "\r"} if kind == "keyDown" else {}))
                # The run that handles the message has started once the message is on the page; then
                # wait for its end (the whole answer).
                await page.wait_for(f"({MESSAGES_JS.strip()}).length >= 2", timeout, "the user's message")
                await page.wait_for(IDLE_JS, timeout, "the end of the script run that answers")
            await asyncio.sleep(1.0)  # let the last frame paint
            png = await page.screenshot(ARTIFACTS / f"{name}.png")
            dom = await page.dom(ARTIFACTS / f"{name}-dom.html")
            return Visit(await page.text(), dom, png, list(await page.eval(MESSAGES_JS)))


def visit(url: str, name: str, ready_text: str, *, chat: str | None = None, timeout: float = 240.0,
          profile: Path) -> Visit:
    """Open ``url`` in headless Chromium, wait for ``ready_text``, optionally send one chat message;
    save ``tests/artifacts/NAME.png`` and ``NAME-dom.html``."""
    with chromium(profile) as devtools:
        return asyncio.run(_visit(devtools, url, name, ready_text, chat, timeout))


def assert_real_png(data: bytes, min_colors: int = 8) -> tuple[int, int]:
    """A decodable, non-blank PNG: magic, IHDR size, and pixels that are not one flat colour."""
    import io

    import numpy as np
    from matplotlib import image

    assert data[:8] == PNG_MAGIC, data[:16]
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 900), (width, height)
    pixels = image.imread(io.BytesIO(data), format="png")
    assert pixels.shape[:2] == (height, width)
    flat = (pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colors = len(np.unique(flat, axis=0))
    assert colors >= min_colors, f"a blank page: {colors} colours"
    assert float(flat.std()) > 5.0, "a nearly flat image"
    return width, height


# --------------------------------------------------------------------------- local Streamlit, real browser


@pytest.fixture(scope="module")
def local_webdemo(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The web demo under ``streamlit run`` on this machine (the test venv), the tiny model loaded."""
    if not os.environ.get("CI"):
        pytest.importorskip("streamlit", reason="streamlit is a dev dependency (pip install -e '.[dev]')")
    script = WEBDEMO_APP.write_to(tmp_path_factory.mktemp("webdemo-app"))
    port = free_port()
    log = (tmp_path_factory.mktemp("webdemo-log") / "streamlit.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(script), "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--server.fileWatcherType", "none",
         "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
         "--", "--model", str(tiny_model), "--max-length", "40"],
        stdout=log, stderr=subprocess.STDOUT, cwd=script.parent, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/_stcore/health", 120.0, proc)  # type: ignore[arg-type]
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop_process(proc, timeout=15)
        log.close()


@pytest.mark.slow
def test_chromium_renders_the_web_demo_and_chats(local_webdemo: str, tmp_path: Path) -> None:
    v = visit(local_webdemo, "webdemo-local", "Chatting with local model", chat="Who are you?", profile=tmp_path)
    assert "Llama3-Instruct" in v.text and "Max Length" in v.text and "Clear Chat History" in v.text
    assert "<title>Llama3-Instruct</title>" in v.dom
    assert [m["role"] for m in v.messages] == ["user", "assistant"], v.messages
    assert v.messages[0]["text"].strip() == "Who are you?"
    assert v.messages[1]["text"].strip(), "an answer was streamed into the page"
    assert_real_png(v.png)
