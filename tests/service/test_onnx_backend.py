"""The service with ``PSN_BACKEND=onnx`` passes the same streaming tests as with PyTorch (issue 5).

The tests of ``test_streaming.py`` are collected here a second time, against a server whose backend
is onnxruntime. The tiny models have no ONNX files, so the backend exports them on the fly into a
cache folder, which is checked too. The ONNX graphs are float32 and the reference is float64, so
scores are compared at float32 precision; spikes and predictions must still be identical.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exported.onnx_export import PARALLEL_FILE, STEP_FILE
from tests.service import test_streaming as streaming
from tests.service.conftest import DEFAULTS, TINY, Server, assert_outputs
from tests.service.test_streaming import (  # noqa: F401  (collected here, run with this module's server)
    test_classify_equals_parallel_form,
    test_concurrent_sessions_equal_parallel_form,
    test_no_future_leakage,
)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def server(model_dir: Path, onnx_cache: Path) -> Iterator[Server]:
    """The shared test server of conftest.py, with the onnxruntime backend."""
    srv = Server({**DEFAULTS, "model_dir": model_dir, "max_steps_per_request": 64, "backend": "onnx",
                  "onnx_cache_dir": onnx_cache, "onnx_threads": 1}, onnx_cache.parent).start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def float32_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """The graphs are float32: scores are compared at float32 precision, spikes still exactly."""
    monkeypatch.setattr(streaming, "assert_outputs", functools.partial(assert_outputs, rel=1e-5, abs=1e-5))


def test_backend_is_onnx_and_exported_every_model_to_the_cache(server: Server, onnx_cache: Path) -> None:
    assert server.settings["backend"] == "onnx"
    health = httpx.get(f"{server.url}/v1/models", timeout=10)
    assert health.status_code == 200
    for name, (neuron, *_rest) in TINY.items():
        [folder] = onnx_cache.glob(f"{name}-*")
        assert (folder / PARALLEL_FILE).is_file()
        assert (folder / STEP_FILE).is_file() == (neuron != "psn")
        assert not (Path(server.settings["model_dir"]) / name / PARALLEL_FILE).exists()  # the model folder is untouched
