"""The argument checks of the scripts in scripts/ that take arguments (real processes, no server or Ray started)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_stream_check_usage_errors_and_no_service(tmp_path):
    """stream_check.py indexed sys.argv blindly (IndexError), listed a missing folder (FileNotFoundError)
    and let a refused connection out as a URLError traceback."""
    for args in ([], ["127.0.0.1:8000"], ["127.0.0.1:8000", str(tmp_path / "missing")]):
        out = _run("stream_check.py", *args)
        assert out.returncode == 2 and "usage: python scripts/stream_check.py" in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
    assert "missing" in out.stderr
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _run("stream_check.py", f"127.0.0.1:{port}", str(tmp_path))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith(f"stream_check: no service answered on http://127.0.0.1:{port}/readyz")
    out = _run("stream_check.py", "--help")
    assert out.returncode == 0 and "HOST:PORT MODELS_DIR [MODEL]" in out.stdout


def test_cluster_smoke_refuses_arguments_it_does_not_take():
    """cluster_smoke.py took any first argument but 'url' as 'ray' (scripts/cluster-smoke --help started Ray
    Serve and a redis-server) and 'url' without its two arguments ended in an IndexError. 'url' comes first:
    without the check it fails at once, before a case that would start Ray."""
    for args in (["url"], ["url", "127.0.0.1:8000"], ["foo"], ["ray", "extra"]):
        out = _run("cluster_smoke.py", *args)
        assert out.returncode == 2 and "usage: python scripts/cluster_smoke.py" in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
    for args in (["-h"], ["--help"]):
        out = _run("cluster_smoke.py", *args)
        assert out.returncode == 0 and "url HOST:PORT KILL" in out.stdout, out.stderr
