"""The review page in a real headless Chromium (Debian `chromium` + `chromium-driver`), driven
over the W3C WebDriver protocol (plain HTTP to chromedriver on 127.0.0.1, no extra Python
package): sign in, see the queue, open an item, approve one, reject one with a reason.

The server is an admin listener hosting the approvals handlers, over a SQLite state store with
seeded held writes. Screenshots go to tests/approvals_browser/ (CI artifacts, git-ignored).
Chromium missing: skipped locally, a failure when `CI` is set (never skipped silently in CI).
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import unavailable
from tests.test_approvals_api import LOCATION, start_env
from tests.test_approvals_support import PASSWORDS, med_hold, obs_update_hold

SHOTS = Path(__file__).parent / "approvals_browser"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
               "--window-size=1280,1100", "--lang=en-US"]


def _binaries() -> tuple[str, str]:
    chrome = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and os.access(p, os.X_OK)), None)
    driver = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver") or "")
                   if p and os.access(p, os.X_OK)), None)
    if chrome is None or driver is None:
        unavailable("headless Chromium not found (Debian packages: chromium chromium-driver)")
    return chrome, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    """Just the WebDriver commands this test needs, over httpx (blocking: call via to_thread)."""

    def __init__(self, driver: str, chrome: str, profile: Path) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen([driver, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", trust_env=False, timeout=60)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.http.get("/status").json()["value"]["ready"]:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chrome, "args": CHROME_ARGS + [f"--user-data-dir={profile}"]}}}}
        self.sid = self._cmd("POST", "/session", caps)["sessionId"]

    def _cmd(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        r = self.http.request(method, path, json=body if body is not None or method == "POST" else None)
        data = r.json()
        if r.status_code != 200:
            raise AssertionError(f"webdriver {method} {path}: {data.get('value', data)}")
        return data["value"]

    def s(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._cmd(method, f"/session/{self.sid}{path}", body if body is not None else ({} if method == "POST" else None))

    def go(self, url: str) -> None:
        self.s("POST", "/url", {"url": url})

    def url(self) -> str:
        return self.s("GET", "/url")

    def find(self, css: str) -> str:
        return self.s("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT] for e in self.s("POST", "/elements", {"using": "css selector", "value": css})]

    def type(self, css: str, text: str) -> None:
        self.s("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self.s("POST", f"/element/{self.find(css)}/click")

    def text(self, css: str) -> str:
        return self.s("GET", f"/element/{self.find(css)}/text")

    def cookies(self) -> list[dict[str, Any]]:
        return self.s("GET", "/cookie")

    def wait(self, pred: Any, what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; at {self.url()}")
            time.sleep(0.1)

    def screenshot(self, name: str) -> Path:
        SHOTS.mkdir(exist_ok=True)
        p = SHOTS / name
        p.write_bytes(base64.b64decode(self.s("GET", "/screenshot")))
        return p

    def close(self) -> None:
        try:
            if getattr(self, "sid", None):
                self.http.delete(f"/session/{self.sid}")
        except httpx.HTTPError:
            pass
        finally:
            self.http.close()
            if self.proc.poll() is None:
                self.proc.terminate()  # by its own Popen handle: only the driver this test started
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)


def browse(wd: WebDriver, base: str, ids: dict[str, str]) -> None:
    # 1. sign in
    wd.go(f"{base}/review/")
    wd.wait(lambda: wd.url().endswith("/review/login"), "the login page")
    wd.type("#reviewer", "alice")
    wd.type("#password", PASSWORDS["alice"])
    wd.screenshot("01-login.png")
    wd.click("#sign-in")
    wd.wait(lambda: wd.url() == f"{base}/review/", "the queue after signing in")
    # the session cookie: kept by Chromium on http://127.0.0.1 with all its flags
    session = next(c for c in wd.cookies() if c["name"] == "__Host-fsr_session")
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict", session
    # 2. the queue
    assert wd.text("#reviewer-name") == "Alice Reviewer"
    assert wd.text("#pending-count") == "3"
    assert len(wd.find_all("#queue tbody tr")) == 3
    wd.screenshot("02-queue.png")
    # 3. open the update: a readable element table and the diff against the current version
    wd.click(f'tr[data-id="{ids["obs"]}"] a')
    wd.wait(lambda: ids["obs"] in wd.url(), "the item page")
    assert wd.text("#item-status") == "PENDING"  # CSS upper-cases the badge
    diff_rows = wd.find_all("#diff tbody tr.changed, #diff tbody tr.added")
    assert len(diff_rows) >= 3
    assert "final" in wd.text("#resource")
    wd.screenshot("03-item-update-diff.png")
    wd.click("#show-unchanged")  # the page's script reveals unchanged elements too
    assert len(wd.find_all("#diff tbody tr")) > len(diff_rows)
    # 4. approve it: released through the (stand-in) pipeline
    wd.click("#approve")
    wd.wait(lambda: "m=released" in wd.url(), "the approval")
    assert wd.text("#item-status") == "RELEASED"
    assert "released" in wd.text("#flash").lower() and wd.text("#location") == LOCATION
    wd.screenshot("04-approved-released.png")
    # 5. open the MedicationRequest and reject it with a reason
    wd.go(f"{base}/review/items/{ids['med']}")
    assert "Amlodipine" in wd.text("#resource")
    reason = "Duplicate of an active order for the same patient."
    wd.type("#reason", reason)
    assert wd.text("#reason-count") == f"{len(reason)} / 1000"  # the page's script counts
    wd.screenshot("05-item-reject-reason.png")
    wd.click("#reject")
    wd.wait(lambda: "m=rejected" in wd.url(), "the rejection")
    assert wd.text("#item-status") == "REJECTED"
    assert wd.text("#rejection-reason") == "Duplicate of an active order for the same patient."
    wd.screenshot("06-rejected.png")
    # 6. back to the queue: one left
    wd.click('a[href="/review/"]')
    wd.wait(lambda: wd.url() == f"{base}/review/", "the queue")
    assert wd.text("#pending-count") == "1" and len(wd.find_all("#queue tbody tr")) == 1
    wd.screenshot("07-queue-after.png")


@pytest.mark.timeout(90)
async def test_review_page_in_headless_chromium(tmp_path: Path) -> None:
    chrome, driver = _binaries()
    env, srv, store = await start_env(tmp_path)
    try:
        ids = {"med": (await env.svc.hold(med_hold())).item_id,
               "obs": (await env.svc.hold(obs_update_hold())).item_id}
        await env.svc.hold(obs_update_hold(method="POST", target="/fhir/R4/Observation", path="/Observation",
                                           interaction="create", resource_id=None, current=None,
                                           fingerprint="c" * 64, client_id="lab-feed"))
        profile = Path(tempfile.mkdtemp(prefix="fhs-chromium-", dir=tmp_path))
        wd = await asyncio.to_thread(WebDriver, driver, chrome, profile)
        try:
            await asyncio.to_thread(browse, wd, f"http://127.0.0.1:{env.port}", ids)
        except BaseException:
            try:
                await asyncio.to_thread(wd.screenshot, "failure.png")
            except Exception:
                pass
            raise
        finally:
            await asyncio.to_thread(wd.close)
        assert [r.item_id for r in env.released] == [ids["obs"]]
        assert sorted((a["decision"], a["reviewer"]) for a in env.audit) == [("approved", "alice"), ("rejected", "alice")]
        item = await env.svc.get(ids["med"])
        assert item.status == "rejected" and item.rejection["reviewer"] == "alice"
    finally:
        await srv.stop()
        await store.close()
