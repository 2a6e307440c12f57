"""Load the Prefect web UI in headless Chromium (DevTools protocol over --remote-debugging-pipe, no extra
package) and return the text it rendered: what a user sees in the browser, API calls included.

The UI keeps the basic-auth string in localStorage (``prefect-password``, base64); a script set before the
page's own ones puts it there, as the login form would. The page's text is read once it shows ``expect``, or
the UI's "Can't connect to Server API" toast, or ``timeout`` seconds have passed (a wait, not an assertion).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

NO_API = "Can't connect to Server API"


def chromium() -> str | None:
    return next((found for name in ("chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)


class _Pipe:
    """Chromium's DevTools pipe: JSON messages, each ended by a NUL byte (it reads fd 3, writes fd 4)."""

    def __init__(self, browser: str, profile: Path) -> None:
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()

        def fds() -> None:  # in the child: its fd 3 reads our commands, fd 4 writes its answers
            a, b = os.dup(to_child), os.dup(from_child)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=fds, pass_fds=(3, 4),
            close_fds=True)
        os.close(to_child)
        os.close(from_child)
        self._buf = b""
        self._id = 0

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._write, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"chromium: {method}: {reply['error']}")
                    return dict(reply.get("result", {}))
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {method} within {timeout:g} s")
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium exited ({self.proc.poll()}) during {method}")
            self._buf += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.call("Browser.close", timeout=10)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._write)
        os.close(self._read)


def ui_text(url: str, profile: Path, expect: str, auth_string: str | None = None, timeout: float = 60,
            browser: str | None = None) -> str:
    """The visible text of the UI page at ``url`` once it shows ``expect`` or the no-API toast (or at
    ``timeout``), logged in with ``auth_string`` when given."""
    pipe = _Pipe(browser or chromium() or "chromium", profile)
    try:
        target = pipe.call("Target.createTarget", url="about:blank")["targetId"]
        session = pipe.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        if auth_string:
            token = base64.b64encode(auth_string.encode()).decode()
            pipe.call("Page.addScriptToEvaluateOnNewDocument", session,
                      source=f"localStorage.setItem('prefect-password', {json.dumps(token)})")
        pipe.call("Page.enable", session)
        pipe.call("Page.navigate", session, url=url)
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            got = pipe.call("Runtime.evaluate", session, expression="document.body ? document.body.innerText : ''",
                            returnByValue=True)
            text = str(got.get("result", {}).get("value", ""))
            if expect in text or NO_API in text:
                break
            time.sleep(0.5)
        return text
    finally:
        pipe.close()
