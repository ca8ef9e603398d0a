"""``python -m service``: settings from PSN_* variables, ready, serving, and a clean exit on SIGTERM."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.config import Settings, default_workers
from tests.service.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def start_service(port: int, settings: dict[str, str], argv: list[str] | None = None,
                  cwd: Path = ROOT, new_session: bool = False) -> subprocess.Popen:
    """``python -m service`` (or ``argv``) on 127.0.0.1:``port`` with these PSN_* settings; output joined.
    ``new_session``: in a process group of its own, as a service started from a terminal."""
    env = {**os.environ, "PSN_PORT": str(port), "PSN_HOST": "127.0.0.1", **settings}
    return subprocess.Popen(argv or [sys.executable, "-m", "service"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=new_session)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float) -> None:
    """Until the service on ``port`` says ready; its output if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"not ready within {timeout:.0f} s"
        time.sleep(0.1)


def test_python_m_service_serves_and_stops_on_sigterm(model_dir: Path) -> None:
    port = free_port()
    proc = start_service(port, {"PSN_MODEL_DIR": str(model_dir), "PSN_MAX_SESSIONS": "3", "PSN_LOG_LEVEL": "info"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, port, 60)
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


def psn_temporary_folders(tmp: Path) -> list[str]:
    """What a service run with TMPDIR=``tmp`` left there of its own (the engine core's socket folder, the front
    ends' metrics folder), not Python's."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("psn-"))


def test_an_engine_core_that_fails_before_it_is_ready_stops_the_service_with_1(tmp_path: Path) -> None:
    """A broken model folder: the engine core exits while starting; the supervisor must stop the service with
    exit status 1 (a crash loop would look alive to a container runtime), and clean up as after any stop: its
    temporary folders removed, the folder of a PSN_ENGINE_ADDRESS it was given left alone (not its to remove)."""
    (tmp_path / "models" / "broken").mkdir(parents=True)
    (tmp_path / "models" / "broken" / "config.json").write_text("{not json")
    (tmp_path / "tmp").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep").write_text("the operator's")
    proc = start_service(free_port(), {"PSN_MODEL_DIR": str(tmp_path / "models"), "PSN_WORKERS": "1",
                                       "PSN_LOG_LEVEL": "info", "TMPDIR": str(tmp_path / "tmp"),
                                       "PSN_ENGINE_ADDRESS": f"unix:{tmp_path}/run/engine.sock"})
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the service did not stop:\n{out[-3000:]}") from None
    assert proc.returncode == 1, out[-3000:]
    assert "before it was ready" in out and out.count("restarting it") == 0, out[-3000:]
    assert psn_temporary_folders(tmp_path / "tmp") == []
    assert (tmp_path / "run" / "keep").read_text() == "the operator's"


def test_ctrl_c_stops_the_service_in_order_and_leaves_no_temporary_folder(model_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C in a terminal sends SIGINT to the whole process group: the supervisor makes it the same ordered stop
    as SIGTERM (the engine core drains), and the engine core leaves it to the supervisor; none of them dies with
    a KeyboardInterrupt. The engine core's socket folder and the metrics folder go with the service."""
    port = free_port()
    proc = start_service(port, {"PSN_MODEL_DIR": str(model_dir), "PSN_WORKERS": "1", "PSN_LOG_LEVEL": "info",
                                "PSN_MALLOC_KEEP_MB": "0", "TMPDIR": str(tmp_path)}, new_session=True)
    try:
        wait_ready(proc, port, 60)
        assert len(psn_temporary_folders(tmp_path)) == 2  # psn-engine-*, psn-metrics-*
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
        assert "engine drained" in out and "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
        assert "freed memory kept=no," in out, out[-3000:]  # PSN_MALLOC_KEEP_MB=0: glibc's own settings
        assert psn_temporary_folders(tmp_path) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize(("cores", "workers"), [(None, 2), (1, 2), (2, 2), (3, 2), (4, 3), (9, 8), (17, 16), (64, 16)])
def test_the_default_front_ends_are_a_core_each_but_the_engine_cores_at_least_two_at_most_16(
        monkeypatch: pytest.MonkeyPatch, cores: int | None, workers: int) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.delenv("PSN_WORKERS", raising=False)
    assert default_workers() == workers and Settings().workers == workers


def run_service(env: dict[str, str], module: str = "service", timeout: float = 90) -> subprocess.CompletedProcess:
    """``python -m module`` with ``env`` on top of ours, to its exit (output joined)."""
    base = {**os.environ, "PSN_PORT": str(free_port()), "PSN_HOST": "127.0.0.1", "PSN_WORKERS": "1",
            "PSN_LOG_LEVEL": "info"}
    return subprocess.run([sys.executable, "-m", module], cwd=ROOT, env={**base, **env}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


@pytest.mark.parametrize("env", [
    {"PSN_WORKERS": "abc"},
    {"PSN_PORT": "99999", "PSN_READ_TIMEOUT_S": "-1"},
    {"PSN_LOG_LEVEL": "loud"},
    {"PSN_DEVICE": "tpu"},
    {"PSN_TORCH_THREADS": "100000"},
], ids=["not-a-number", "two-bad", "log-level", "device", "threads"])
def test_a_bad_setting_stops_the_service_with_a_line_naming_each_bad_variable(env: dict[str, str]) -> None:
    done = run_service(env)
    assert done.returncode == 1, done.stdout
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[1].strip() for line in lines] == list(env), done.stdout
    for line, value in zip(lines, env.values(), strict=True):
        assert line.startswith("psn-stream: PSN_") and f"(got {value!r})" in line, done.stdout


def test_log_level_is_any_case() -> None:
    assert Settings(log_level="WARNING").log_level == "warning"  # type: ignore[arg-type]


@pytest.mark.parametrize(("env", "says"), [
    ({"PSN_BACKEND": "tensorrt"}, "PSN_BACKEND: unknown backend 'tensorrt'"),
    ({"PSN_MODEL_DIR": "no-such-folder"}, "PSN_MODEL_DIR: 'no-such-folder' is not a folder"),
    ({"PSN_MODEL_DIR": "service"}, "PSN_MODEL_DIR: no model folders under 'service' (each model is a folder"),
    ({"PSN_MODEL_DIR": "exported/mnist1d-sliding"}, "is a model folder itself: set PSN_MODEL_DIR to the folder"),
    ({"PSN_STATE_URL": "http://127.0.0.1:1/0"}, "PSN_STATE_URL: expected redis://"),
    ({"PSN_STATE_URL": "redis://127.0.0.1:1/0"}, "PSN_STATE_URL: the session store cannot be reached: "),
    ({"PSN_STATE_DIR": "pyproject.toml"}, "PSN_STATE_DIR: cannot keep the session log in 'pyproject.toml' (a folder "),
    ({"PSN_STATE_DIR": "pyproject.toml/state"}, "PSN_STATE_DIR: cannot keep the session log in 'pyproject.toml/state'"),
    ({"PSN_DEVICE": "cuda"}, "PSN_DEVICE=cuda: this torch sees no CUDA device"),
    ({"PSN_CLUSTER": "1"}, "PSN_CLUSTER=1 needs PSN_STATE_URL=redis://"),
], ids=["backend", "model-dir", "no-models", "a-model-folder", "state-url", "state-url-unreachable", "state-dir-file",
        "state-dir-under-a-file", "cuda", "cluster-without-state-url"])
def test_a_setting_the_engine_core_cannot_use_stops_the_service_with_its_message_not_a_traceback(
        model_dir: Path, env: dict[str, str], says: str) -> None:
    if "PSN_DEVICE" in env:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
    done = run_service({"PSN_MODEL_DIR": str(model_dir), **env})
    assert done.returncode == 1, done.stdout[-3000:]
    assert "ERROR psn.engine" in done.stdout and says in done.stdout, done.stdout[-3000:]
    assert "Traceback" not in done.stdout and "exited with 1 before it was ready" in done.stdout, done.stdout[-3000:]


def test_a_front_end_waiting_for_the_engine_core_stops_when_asked(model_dir: Path) -> None:
    """A front end waits up to PSN_FRONTEND_WAIT_S in its start-up for the engine core's hello, and uvicorn
    acts on a SIGTERM only once start-up is over: an engine core that failed to start left the service up for
    the whole wait (10 s by default), its front end logging itself "up" on the way out. The wait now ends at
    the supervisor's stop; with a wait of an hour the service still exits (run_service's timeout would
    fire otherwise), and says the front end stopped before it took connections."""
    done = run_service({"PSN_MODEL_DIR": str(model_dir), "PSN_BACKEND": "tensorrt", "PSN_FRONTEND_WAIT_S": "3600"},
                       timeout=60)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "front end 0 stopping before it took connections" in done.stdout, done.stdout[-3000:]
    assert "front end 0 up" not in done.stdout, done.stdout[-3000:]


def test_the_engine_core_takes_its_thread_count_and_warms_up_only_when_asked(
        model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """build_core, the engine core's start-up in this process: PSN_TORCH_THREADS is torch's thread count (unset:
    torch's own), PSN_WARMUP=false loads the models without running them."""
    import torch

    from service.core.proc import build_core

    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            build_core(Settings(model_dir=model_dir, torch_threads=threads, warmup=False))
            assert torch.get_num_threads() == threads
        with caplog.at_level(logging.INFO, logger="psn.engine"):
            caplog.clear()
            build_core(Settings(model_dir=model_dir, torch_threads=None, warmup=False))
            assert torch.get_num_threads() == 1 and "warmed up" not in caplog.text
            build_core(Settings(model_dir=model_dir, warmup=True))
            warmed = {line.split()[2] for line in caplog.messages if line.startswith("warmed up model=")}
            assert warmed == {f"model={folder.name}" for folder in model_dir.iterdir()}
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("env", "says"), [
    ({"PSN_RAY_REPLICAS": "two"}, "service.ray: PSN_RAY_REPLICAS: expected a whole number > 0, got 'two'"),
    ({"PSN_RAY_REPLICAS": "0"}, "service.ray: PSN_RAY_REPLICAS: expected a whole number > 0, got '0'"),
    ({"PSN_RAY_REPLICA_CPUS": "nan"}, "service.ray: PSN_RAY_REPLICA_CPUS: expected a number > 0, got 'nan'"),
    ({"PSN_WORKERS": "x"}, "service.ray: PSN_WORKERS: Input should be a valid integer"),
], ids=["replicas-word", "replicas-0", "cpus-nan", "service-setting"])
def test_python_m_service_ray_names_a_bad_setting(env: dict[str, str], says: str) -> None:
    pytest.importorskip("ray.serve", reason="the cluster extra: pip install -e '.[cluster]'")
    done = run_service({"PSN_STATE_URL": "redis://127.0.0.1:1/0", **env}, module="service.ray")
    assert done.returncode == 1 and done.stdout.strip().splitlines() == [done.stdout.strip()], done.stdout
    assert done.stdout.startswith(says), done.stdout


def test_scripts_serve_reads_a_relative_model_dir_from_where_it_is_run(model_dir: Path, tmp_path: Path) -> None:
    """scripts/serve moves to the repository to set up and start: a relative PSN_MODEL_DIR (or state dir) is
    the caller's, so it is made absolute first (it was read from the repository: no model folders there)."""
    (tmp_path / "models").symlink_to(model_dir)
    port = free_port()
    proc = start_service(port, {"PSN_MODEL_DIR": "models", "PSN_STATE_DIR": "state", "PSN_WORKERS": "1",
                                "PSN_LOG_LEVEL": "warning"}, [str(ROOT / "scripts" / "serve")], cwd=tmp_path)
    try:
        wait_ready(proc, port, 90)
        names = {m["name"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["models"]}
        assert names == {p.name for p in model_dir.iterdir() if (p / "config.json").is_file()}
        assert (tmp_path / "state").is_dir()  # the session log is where the caller said
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_python_m_service_help_lists_every_setting_with_the_default_the_docs_give() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSN_")}
    done = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m service"), done.stdout + done.stderr
    shown = dict(re.findall(r"^  (PSN_[A-Z0-9_]+) +(.*)$", done.stdout, flags=re.M))
    assert set(shown) == {f"PSN_{name.upper()}" for name in Settings.model_fields}
    docs = dict(re.findall(r"^\| `(PSN_[A-Z0-9_]+)` \| `([^`|]*)` \|", (ROOT / "docs" / "api.md").read_text(),
                           flags=re.M))
    compared = [name for name in docs if name in shown and docs[name]]
    for name in compared:
        same = shown[name] == docs[name] or (re.fullmatch(r"-?[0-9.e+]+", docs[name]) is not None and
                                             float(shown[name]) == float(docs[name]))
        assert same, f"{name}: --help says {shown[name]!r}, docs/api.md {docs[name]!r}"
    assert len(compared) >= 20
    assert shown["PSN_WORKERS"].startswith(f"{default_workers()} here")


def test_help_into_a_reader_that_stops_early_is_no_traceback() -> None:
    """``python -m service --help | head -1``: the reader closes the pipe after one line, and the help's
    write (or Python's flush at exit) ended in a BrokenPipeError traceback."""
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "service", "--help"], cwd=ROOT, stdout=w, stderr=subprocess.PIPE,
                            text=True)
    os.close(w)
    os.close(r)  # read nothing: the reader is gone before the help is written
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err and "BrokenPipeError" not in err, err


@pytest.mark.parametrize("module", ["service", "service.ray"])
def test_an_argument_is_a_usage_error_not_silently_ignored(module: str) -> None:
    """``--port 9000`` would still have listened on PSN_PORT: settings are environment variables."""
    if module == "service.ray":
        pytest.importorskip("ray.serve", reason="the cluster extra: pip install -e '.[cluster]'")
    done = subprocess.run([sys.executable, "-m", module, "--port", "9000"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert f"python -m {module}: takes no arguments, got '--port 9000'" in done.stderr
    assert "PSN_PORT=9000" in done.stderr


def test_a_port_in_use_or_an_address_not_here_is_one_line_not_a_traceback() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for env, says in (({"PSN_PORT": str(port)}, "Address already in use"),
                          ({"PSN_HOST": "no-such-host.invalid"}, "")):
            done = run_service(env)
            assert done.returncode == 1, done.stdout
            host = env.get("PSN_HOST", "127.0.0.1")
            assert done.stdout.startswith(f"psn-stream: cannot listen on {host}:"), done.stdout
            assert says in done.stdout and "Traceback" not in done.stdout and len(done.stdout.splitlines()) == 1
            assert "[Errno" not in done.stdout, done.stdout  # the reason in words, not the exception's repr


def _children(pid: int) -> set[int]:
    """The engine core and front ends of the supervisor ``pid`` (from /proc: its children that run a spawned
    process's main, not multiprocessing's resource tracker)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            out.add(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_sigterm_while_the_engine_core_is_still_starting_stops_everything(model_dir: Path) -> None:
    """Stopped before it was ready (a deploy rolled back at once): the supervisor must not wait for a
    readiness that no longer matters, nor leave an engine core or a front end behind."""
    port = free_port()
    proc = start_service(port, {"PSN_MODEL_DIR": str(model_dir), "PSN_WORKERS": "2", "PSN_LOG_LEVEL": "info"})
    try:
        assert proc.stdout is not None
        seen = ""
        while "starting the engine core" not in seen:  # its signal handlers are in place
            line = proc.stdout.readline()
            assert line, seen
            seen += line
        deadline = time.monotonic() + 30
        while len(kids := _children(proc.pid)) < 3:  # two front ends and the engine core, still starting
            assert time.monotonic() < deadline, kids
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGTERM), seen + out
        assert "Traceback" not in seen + out, seen + out
        assert not [pid for pid in kids if _running(pid)]  # the supervisor waited for each
        with socket.socket() as again:  # nothing holds the port
            again.bind(("127.0.0.1", port))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_runs_replicas_argument_is_checked() -> None:
    ray = pytest.importorskip("service.ray", reason="the cluster extra: pip install -e '.[cluster]'")
    from service.config import BadSetting

    for bad in ("two", "0", "-1"):
        with pytest.raises(BadSetting, match=f"replicas: expected a whole number > 0, got '{bad}'"):
            ray.app_builder({"replicas": bad})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG: Linux only")
def test_a_supervisor_killed_with_sigkill_leaves_no_front_end_or_engine_core(serve) -> None:
    srv = serve()
    health = httpx.get(f"{srv.url}/healthz", timeout=10).json()
    pids = [health["pid"], health["engine_pid"]]
    assert srv.proc is not None
    srv.proc.kill()
    srv.proc.wait()
    deadline = time.monotonic() + 20
    while left := [p for p in pids if _running(p)]:
        if time.monotonic() > deadline:
            for p in left:
                os.kill(p, signal.SIGKILL)
            raise AssertionError(f"{left} outlived the supervisor (front end, engine core: {pids})")
        time.sleep(0.05)
