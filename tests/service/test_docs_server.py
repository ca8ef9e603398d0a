"""The README's and docs' examples that talk to a server run against a real one serving exported/.

``localhost:8000`` in an example becomes the test server's address. Shell blocks made only of curl
calls run with ``bash -euo pipefail``; python blocks run as scripts; js blocks run as a module in a page
of the server in a real headless Chromium (skipped, saying why, without one). A block that sends the
docs' API key runs against a second server with access control on and that key. A block with the docs'
made-up session id is only run for the answer printed after it (in a fresh session of the model the docs
open it for): what the docs print as a curl example's answer (the json block after it, or a JSON comment
after the command) is checked against what the server answers.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from decimal import Decimal

import httpx
import pytest

from tests.test_docs import REPO, SERVER, fenced

MADE_UP_ID = "kY3v0f9yQm2c8pX1b7ZtNw"
DOCS_KEY = "0123456789abcdef0123456789abcdef"  # the API key the docs' access-control examples send


def _curl_only(code: str) -> bool:
    lines = [ln for ln in code.replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")]
    setting = re.compile(r"\s*\w+=[\w.-]+\s*(#.*)?$")  # KEY=0123... (a value the curl lines use)
    return bool(lines) and all(re.match(r"\s*(curl |\w+=\$\(curl )", ln) or setting.match(ln) for ln in lines)


SHELL = [(w, c) for w, c in fenced("bash") if _curl_only(c) and MADE_UP_ID not in c and "/readyz" not in c]
PYTHON = [(w, c) for w, c in fenced("python") if SERVER.search(c)]
BROWSER = fenced("js")
# The model of the docs' made-up session: the printed answer that opens it says which.
MADE_UP_MODEL = next(json.loads(c)["model"] for _, c in fenced("json") if MADE_UP_ID in c and '"model"' in c)
VARIES = {"expires_in_s", "worker"}  # a clock reading (printed as at the session's opening); which front end answered


def _printed_answers() -> list[tuple[str, str, str]]:
    """(where, code, json) of every curl-only shell block with a json block right after it (its answer), and of
    every ``curl URL  # {...}`` line whose comment is JSON."""
    curls = {w: c for w, c in fenced("bash") if _curl_only(c)}
    out = [(w, m[1], m[2]) for w, c in fenced("bash")
           for m in re.finditer(r"^(curl [^#\n]*?)\s+# (\{.*\})$", c, flags=re.M)]
    for where, shown in fenced("json"):
        path, line = where.rsplit(":", 1)
        for w, code in curls.items():
            if w.rsplit(":", 1)[0] == path and int(w.rsplit(":", 1)[1]) + code.count("\n") + 2 == int(line):
                out.append((w, code, shown))
    return out


ANSWERS = _printed_answers()


def _started(tmp_path_factory: pytest.TempPathFactory, **settings):
    from service.config import Settings
    from tests.service.conftest import DEFAULTS, Server

    idle = Settings.model_fields["idle_timeout_s"].default  # the service's, which the printed answers show
    return Server({**DEFAULTS, "model_dir": REPO / "exported", "dtype": "float32", "idle_timeout_s": idle,
                   **settings}, tmp_path_factory.mktemp("docs")).start()


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory: pytest.TempPathFactory):
    srv = _started(tmp_path_factory, state_dir=tmp_path_factory.mktemp("state"))  # durable, as in the Docker image
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory):
    """The shipped models with access control on: the docs' key is one of the server's."""
    srv = _started(tmp_path_factory, api_keys=DOCS_KEY)
    yield srv
    srv.stop()


def _server_for(request: pytest.FixtureRequest, code: str):
    return request.getfixturevalue("keyed_server" if DOCS_KEY in code else "shipped_server")


def _local(code: str, port: int) -> str:
    return re.sub(r"(localhost|127\.0\.0\.1):8000", f"127.0.0.1:{port}", code)


def test_there_are_server_examples():
    assert len(SHELL) >= 2 and len(PYTHON) >= 2 and len(BROWSER) >= 2 and len(ANSWERS) >= 4
    assert any(DOCS_KEY in c for _, c in SHELL) and any(DOCS_KEY in c for _, c in PYTHON)


@pytest.mark.parametrize("where,code", SHELL, ids=[w for w, _ in SHELL])
def test_curl_example_runs(request, where, code):
    srv = _server_for(request, code)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", _local(code, srv.port)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{where}: {proc.stderr}"
    assert '"error"' not in proc.stdout, f"{where}: {proc.stdout[:2000]}"


@pytest.mark.parametrize("where,code", PYTHON, ids=[w for w, _ in PYTHON])
def test_python_server_example_runs(request, where, code):
    srv = _server_for(request, code)
    proc = subprocess.run([sys.executable, "-c", _local(code, srv.port)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{where}: {proc.stderr[-3000:]}"


def _differences(shown, real, path: str = "") -> list[str]:
    """Where ``real`` is not what the docs print: ``"..."`` stands for the rest of a list or object, a number
    is compared to the digits printed, the made-up session id stands for any id."""
    if shown == "..." or path.rsplit(".", 1)[-1] in VARIES or (shown == MADE_UP_ID and isinstance(real, str)):
        return []
    if isinstance(shown, dict) and isinstance(real, dict):
        out = [f"{path}.{k}: not in the answer" for k in shown if k != "..." and k not in real]
        if "..." not in shown and set(real) - set(shown):
            out.append(f"{path}: the answer also has {sorted(set(real) - set(shown))}")
        return out + [d for k, v in shown.items() if k in real for d in _differences(v, real[k], f"{path}.{k}")]
    if isinstance(shown, list) and isinstance(real, list):
        head = shown[:-1] if shown and shown[-1] == "..." else shown
        if len(real) < len(head) or (head is shown and len(real) != len(shown)):
            return [f"{path}: {len(real)} items, the docs print {len(shown)}"]
        return [d for i, v in enumerate(head) for d in _differences(v, real[i], f"{path}[{i}]")]
    if isinstance(shown, Decimal) and isinstance(real, int | float) and not isinstance(real, bool):
        if abs(Decimal(repr(real)) - shown) <= Decimal(1).scaleb(shown.as_tuple().exponent) / 2:
            return []
    elif type(shown) is type(real) and shown == real:
        return []
    return [f"{path}: the docs print {shown!r}, the server answers {real!r}"]


@pytest.mark.parametrize("where,code,shown", ANSWERS, ids=[w for w, _, _ in ANSWERS])
def test_printed_answer_is_the_servers(shipped_server, where, code, shown):
    if MADE_UP_ID in code:
        opened = httpx.post(f"{shipped_server.url}/v1/sessions", json={"model": MADE_UP_MODEL}, timeout=20)
        code = code.replace(MADE_UP_ID, opened.json()["session_id"])
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", _local(code, shipped_server.port)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{where}: {proc.stderr}"
    wrong = _differences(json.loads(shown, parse_float=Decimal), json.loads(proc.stdout))
    assert not wrong, f"{where}: {wrong}"


# Every WebSocket the page makes, what it sends and what it gets (binary frames as byte lists).
RECORD_SOCKETS = """
window.__sockets = [];
window.WebSocket = class extends window.WebSocket {
  constructor(...args) {
    super(...args);
    const rec = {sent: [], got: [], closed: null, failed: false};
    window.__sockets.push(rec);
    this.__rec = rec;
    const bytes = (d) => typeof d === "string" ? d : Array.from(new Uint8Array(d));
    this.addEventListener("message", (ev) => rec.got.push(bytes(ev.data)));
    this.addEventListener("close", (ev) => { rec.closed = ev.code; });
    this.addEventListener("error", () => { rec.failed = true; });
  }
  send(data) {
    this.__rec.sent.push(typeof data === "string" ? data : Array.from(new Uint8Array(data)));
    super.send(data);
  }
};
"""


@pytest.mark.parametrize("where,code", BROWSER, ids=[w for w, _ in BROWSER])
def test_browser_example_runs(request, where, code):
    """The page's sockets open and each message gets its answer, never an error; a binary steps answer (and
    what the example logs from it) is what /v1/classify gives for the steps the page sent."""
    from tests.service.test_demo import CHROMIUM, _playwright

    sync_api = _playwright()
    srv = _server_for(request, code)
    errors: list[str] = []
    logged: list[str] = []

    def console(m) -> None:
        if m.type == "error" and not m.text.startswith("Failed to load resource"):  # the page's favicon.ico
            errors.append(m.text)
        logged.append(m.text)

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", console)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.add_init_script(RECORD_SOCKETS)
            page.goto(f"{srv.url}/healthz")  # a page served by the server
            page.add_script_tag(content=_local(code, srv.port), type="module")
            page.wait_for_function("""() => window.__sockets.length > 0 && window.__sockets.every(
                r => r.closed !== null || r.failed || (r.sent.length > 0 && r.got.length >= r.sent.length))""",
                                   timeout=30_000)
            sockets = page.evaluate("window.__sockets")
        finally:
            browser.close()
    assert not errors, f"{where}: {errors}"
    for rec in sockets:
        assert rec["closed"] is None and not rec["failed"], f"{where}: the WebSocket failed: {rec}"
        texts = [json.loads(m) for m in rec["got"] if isinstance(m, str)]
        assert all(m["type"] != "error" for m in texts), f"{where}: {texts}"
        frames = [bytes(m) for m in rec["sent"] if not isinstance(m, str)]
        opened = [json.loads(m).get("model") for m in rec["sent"] if isinstance(m, str)]
        answers = [bytes(m) for m in rec["got"] if not isinstance(m, str)]
        assert len(answers) == len(frames)
        for frame, answer in zip(frames, answers, strict=True):
            _, n, start = struct.unpack_from("<IIq", frame)
            steps = struct.unpack_from(f"<{(len(frame) - 16) // 4}f", frame, 16)
            with httpx.Client(base_url=srv.url, timeout=20, headers={"Authorization": f"Bearer {DOCS_KEY}"}) as c:
                shape = c.get(f"/v1/models/{opened[0]}").json()["input_shape"]
                width = len(steps) // n
                want = c.post("/v1/classify", json={"model": opened[0], "steps": [
                    _nest(list(steps[i * width:(i + 1) * width]), shape) for i in range(n)]}).json()["outputs"]
            _, L, first, _, n_out, C, nb = struct.unpack_from("<IIqIIII", answer)
            predicted = struct.unpack_from(f"<{L}i", answer, 32 + 4 * L * C)
            fired = [sum(bin(b).count("1") for b in answer[32 + 4 * L * C + 4 * L + k * nb:][:nb]) for k in range(L)]
            assert first == 0 and start == -1 and L == n
            assert list(predicted) == [o["predicted"] for o in want], where
            assert fired == [sum(o["spikes"]) for o in want], where
            shown = [f"step {k}: class {o['predicted']}, {sum(o['spikes'])} spikes" for k, o in enumerate(want)]
            assert all(any(line.startswith(s) for line in logged) for s in shown), (where, shown, logged)


def _nest(flat: list[float], shape: list[int]):
    """A flat list of prod(shape) numbers as nested lists of that shape."""
    for size in reversed(shape[1:]):
        flat = [flat[i:i + size] for i in range(0, len(flat), size)]
    return flat


def test_model_list_is_small_and_detail_has_the_history(shipped_server) -> None:
    import httpx

    with httpx.Client(base_url=shipped_server.url, timeout=20) as c:
        brief = c.get("/v1/models")
        full = c.get("/v1/models", params={"detail": "true"}).json()["models"]
        one = c.get(f"/v1/models/{full[0]['name']}").json()
    assert len(brief.content) < 12_000 < len(str(full))
    assert all("history" not in m["metrics"] and "test_acc_streaming" in m["metrics"] for m in brief.json()["models"])
    assert "history" in full[0]["metrics"] and one["metrics"] == full[0]["metrics"]
