"""``python -m service``: settings from PSN_* variables, ready, serving, and a clean exit on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.config import Settings, default_workers
from tests.service.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_python_m_service_serves_and_stops_on_sigterm(model_dir: Path) -> None:
    port = free_port()
    env = {**os.environ, "PSN_MODEL_DIR": str(model_dir), "PSN_PORT": str(port), "PSN_HOST": "127.0.0.1",
           "PSN_MAX_SESSIONS": "3", "PSN_LOG_LEVEL": "info"}
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready within 60 s"
            time.sleep(0.1)
        with httpx.Client(base_url=url) as c:
            for _ in range(3):
                assert c.post("/v1/sessions", json={"model": "sliding"}).status_code == 201
            assert c.post("/v1/sessions", json={"model": "sliding"}).status_code == 503  # PSN_MAX_SESSIONS=3
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal: exit status 0 or -SIGTERM
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        out = proc.stdout.read() if proc.stdout else ""
        assert "engine drained" in out and "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_engine_core_that_fails_before_it_is_ready_stops_the_service_with_1(tmp_path: Path) -> None:
    """A broken model folder: the engine core exits while starting; the supervisor must stop the service with
    exit status 1 (a crash loop would look alive to a container runtime)."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    env = {**os.environ, "PSN_MODEL_DIR": str(tmp_path), "PSN_PORT": str(free_port()), "PSN_HOST": "127.0.0.1",
           "PSN_WORKERS": "1", "PSN_LOG_LEVEL": "info"}
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the service did not stop:\n{out[-3000:]}") from None
    assert proc.returncode == 1, out[-3000:]
    assert "before it was ready" in out and out.count("restarting it") == 0, out[-3000:]



@pytest.mark.parametrize(("cores", "workers"), [(None, 2), (1, 2), (2, 2), (3, 2), (4, 3), (9, 8), (17, 16), (64, 16)])
def test_the_default_front_ends_are_a_core_each_but_the_engine_cores_at_least_two_at_most_16(
        monkeypatch: pytest.MonkeyPatch, cores: int | None, workers: int) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.delenv("PSN_WORKERS", raising=False)
    assert default_workers() == workers and Settings().workers == workers
