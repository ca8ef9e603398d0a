"""The README's and docs' examples that talk to a server run against a real one serving exported/.

``localhost:8000`` in an example becomes the test server's address. Shell blocks made only of curl
calls run with ``bash -euo pipefail``; python blocks run as scripts. A block with the docs' made-up
session id is illustration only and is left out.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.test_docs import REPO, SERVER, fenced

MADE_UP_ID = "kY3v0f9yQm2c8pX1b7ZtNw"


def _curl_only(code: str) -> bool:
    lines = [ln for ln in code.replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")]
    return bool(lines) and all(re.match(r"\s*(curl |\w+=\$\(curl )", ln) for ln in lines)


SHELL = [(w, c) for w, c in fenced("bash") if _curl_only(c) and MADE_UP_ID not in c and "/readyz" not in c]
PYTHON = [(w, c) for w, c in fenced("python") if SERVER.search(c)]


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory: pytest.TempPathFactory):
    from tests.service.conftest import DEFAULTS, Server

    srv = Server({**DEFAULTS, "model_dir": REPO / "exported", "dtype": "float32"},
                 tmp_path_factory.mktemp("docs")).start()
    yield srv
    srv.stop()


def _local(code: str, port: int) -> str:
    return re.sub(r"(localhost|127\.0\.0\.1):8000", f"127.0.0.1:{port}", code)


def test_there_are_server_examples():
    assert len(SHELL) >= 2 and len(PYTHON) >= 2


@pytest.mark.parametrize("where,code", SHELL, ids=[w for w, _ in SHELL])
def test_curl_example_runs(shipped_server, where, code):
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", _local(code, shipped_server.port)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{where}: {proc.stderr}"
    assert '"error"' not in proc.stdout, f"{where}: {proc.stdout[:2000]}"


@pytest.mark.parametrize("where,code", PYTHON, ids=[w for w, _ in PYTHON])
def test_python_server_example_runs(shipped_server, where, code):
    proc = subprocess.run([sys.executable, "-c", _local(code, shipped_server.port)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{where}: {proc.stderr[-3000:]}"


def test_model_list_is_small_and_detail_has_the_history(shipped_server) -> None:
    import httpx

    with httpx.Client(base_url=shipped_server.url, timeout=20) as c:
        brief = c.get("/v1/models")
        full = c.get("/v1/models", params={"detail": "true"}).json()["models"]
        one = c.get(f"/v1/models/{full[0]['name']}").json()
    assert len(brief.content) < 12_000 < len(str(full))
    assert all("history" not in m["metrics"] and "test_acc_streaming" in m["metrics"] for m in brief.json()["models"])
    assert "history" in full[0]["metrics"] and one["metrics"] == full[0]["metrics"]
