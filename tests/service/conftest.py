"""Fixtures: tiny float64 model folders and the real service (``python -m service``) on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from model.folder import load_model_folder, save_model_folder
from model.network import LayerConfig, NetConfig, PSNNet
from tests.nets import make_spiking

# name -> (neuron, T, k, input_shape, layers)
TINY = {
    "sliding": ("sliding", None, 3, (3,), (LayerConfig("linear", 8), LayerConfig("linear", 6))),
    "masked": ("masked", 24, 4, (3,), (LayerConfig("linear", 8),)),
    "conv": ("sliding", None, 2, (2, 5), (LayerConfig("conv", 3, kernel_size=3), LayerConfig("linear", 7))),
    "lif": ("lif", None, 1, (3,), (LayerConfig("linear", 8),)),
    "full": ("psn", 6, 1, (3,), (LayerConfig("linear", 8),)),
}


def make_model(path: Path, neuron: str, T: int | None, k: int, input_shape: tuple[int, ...], layers, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = NetConfig(input_shape=input_shape, num_classes=4, layers=layers, neuron=neuron, k=k, T=T,
                    input_mean=0.1, input_std=0.9)
    net = make_spiking(PSNNet(cfg).double(), bn_mean=0.3, bn_affine=False)
    save_model_folder(path, net, class_names=["w", "x", "y", "z"], dataset="random")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for i, (name, spec) in enumerate(TINY.items()):
        make_model(root / name, *spec, seed=i)
    return root


class Reference:
    """The parallel form of each tiny model, float64: what every streamed answer must equal."""

    def __init__(self, root: Path):
        self.models = {name: load_model_folder(root / name, dtype=torch.float64) for name in TINY}

    def input_shape(self, name: str) -> tuple[int, ...]:
        return self.models[name].cfg.input_shape

    def sequence(self, name: str, T: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(T, *self.input_shape(name), generator=g, dtype=torch.float64) * 1.5

    @torch.no_grad()
    def outputs(self, name: str, x: torch.Tensor) -> tuple[list, list[list[float]]]:
        out = self.models[name].net(x.unsqueeze(1))
        return out.spikes[:, 0].to(torch.uint8).tolist(), out.scores[:, 0].tolist()


def assert_outputs(outputs: list[dict], ref: tuple[list, list], start: int = 0, *, rel: float = 1e-9,
                   abs: float = 1e-12) -> None:  # noqa: A002 - named as in pytest.approx
    spikes, scores = ref
    for i, o in enumerate(outputs):
        t = start + i
        assert o["index"] == t
        assert o["spikes"] == spikes[t], f"spikes differ at step {t}"
        assert o["scores"] == pytest.approx(scores[t], rel=rel, abs=abs), f"scores differ at step {t}"
        assert o["predicted"] == max(range(len(scores[t])), key=lambda c: scores[t][c])


def oip_sequence(steps, sequence_id: int | str, outputs: tuple[str, ...] | None = None, **parameters) -> dict:
    """A JSON ``/v2/models/{name}/infer`` body: the next steps ``(L, *input_shape)`` of one sequence, as FP32;
    ``outputs``: the outputs to ask for (default: all); ``parameters``: sequence_start, sequence_end, ..."""
    a = np.asarray(steps, np.float32)
    body = {"inputs": [{"name": "steps", "shape": [1, *a.shape], "datatype": "FP32", "data": a.ravel().tolist()}],
            "parameters": {"sequence_id": sequence_id, **parameters}}
    if outputs is not None:
        body["outputs"] = [{"name": n} for n in outputs]
    return body


@pytest.fixture(scope="session")
def ref(model_dir: Path) -> Reference:
    return Reference(model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = Path(__file__).resolve().parents[2]


class Server:
    """The real service, ``python -m service`` (supervisor, engine core, front ends), on 127.0.0.1.

    ``stop()`` sends SIGTERM, as a container runtime does; ``log()`` is everything it printed.
    """

    def __init__(self, settings: dict, log_dir: Path):
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/stream"
        self.env = {**os.environ, **{f"PSN_{k.upper()}": str(v) for k, v in settings.items()},
                    "PSN_HOST": "127.0.0.1", "PSN_PORT": str(self.port), "PSN_LOG_LEVEL": "info"}
        self.log_path = log_dir / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Server:
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        """Until every front-end worker has answered /readyz with 200."""
        deadline = time.monotonic() + timeout
        ready: set[int] = set()
        while True:
            assert self.proc is not None and self.proc.poll() is None, f"the service exited:\n{self.log()}"
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=2, headers={"connection": "close"})
                if r.status_code == 200:
                    ready.add(r.json()["worker"])
                    if len(ready) == int(self.settings.get("workers", 1)):
                        return
                    continue
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready within {timeout} s:\n{self.log()}"
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> dict[int, int]:
        """Front-end worker index -> pid, asked of /healthz until every worker has answered."""
        pids: dict[int, int] = {}
        deadline = time.monotonic() + 20
        with httpx.Client(base_url=self.url, timeout=5) as c:
            while len(pids) < int(self.settings.get("workers", 1)) and time.monotonic() < deadline:
                h = c.get("/healthz", headers={"connection": "close"}).json()
                pids[h["worker"]] = h["pid"]
        return pids

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the service did not stop within {timeout} s:\n{self.log()}") from None


DEFAULTS = dict(dtype="float64", device="cpu", max_wait_ms=2.0, idle_timeout_s=60, max_sessions=64, torch_threads=1,
                workers=1)


@pytest.fixture
def serve(model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``serve(**settings)`` starts a server with these settings (on top of the test defaults)."""
    started: list[Server] = []

    def start(**overrides) -> Server:
        srv = Server({**DEFAULTS, "model_dir": model_dir, **overrides}, tmp_path)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module", params=[1, 2], ids=["workers=1", "workers=2"])
def server(request: pytest.FixtureRequest, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Server]:
    """One shared server with the test defaults, once with one front-end worker and once with two."""
    srv = Server({**DEFAULTS, "model_dir": model_dir, "max_steps_per_request": 64, "workers": request.param},
                 tmp_path_factory.mktemp("server")).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=20) as c:
        yield c
