"""Fixtures: tiny float64 model folders and real uvicorn servers on 127.0.0.1 (a thread each)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from model.folder import load_model_folder, save_model_folder
from model.network import LayerConfig, NetConfig, PSNNet
from service.config import Settings
from service.main import create_app
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


@pytest.fixture(scope="session")
def ref(model_dir: Path) -> Reference:
    return Reference(model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real uvicorn server in a thread; ``stop()`` asks it to exit like SIGTERM does."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/stream"
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                             ws_max_size=4 * settings.max_request_bytes, timeout_graceful_shutdown=10,
                             ws_per_message_deflate=settings.ws_compression)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def serve(model_dir: Path) -> Iterator[Callable[..., Server]]:
    """``serve(**settings)`` starts a server with these settings (on top of the test defaults)."""
    started: list[Server] = []

    def start(**overrides) -> Server:
        base = dict(model_dir=model_dir, dtype="float64", device="cpu", max_wait_ms=2.0, idle_timeout_s=60,
                    max_sessions=64, torch_threads=1)
        srv = Server(Settings(**{**base, **overrides})).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Server]:
    """One shared server with the test defaults, for tests that do not need special settings."""
    srv = Server(Settings(model_dir=model_dir, dtype="float64", device="cpu", max_wait_ms=2.0, idle_timeout_s=60,
                          max_sessions=64, max_steps_per_request=64, torch_threads=1)).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=20) as c:
        yield c
