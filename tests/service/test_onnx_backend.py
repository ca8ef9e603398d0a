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
import numpy as np
import pytest
import torch

from exported.onnx_export import PARALLEL_FILE, STEP_FILE
from tests.service import test_streaming as streaming
from tests.service.conftest import DEFAULTS, TINY, Server, assert_outputs, make_model
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


# ----- the backend object itself (no server): what a mutation sweep of service/backends/onnx.py found ------
@pytest.fixture(scope="module")
def backend_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-backend-cache")


def _onnx_backend(model, max_slots: int, cache: Path):
    from service.backends import get_backend_class
    from service.config import Settings

    return get_backend_class("onnx")(model, max_slots, Settings(onnx_cache_dir=cache, onnx_threads=1))


@torch.no_grad()
def test_onnx_backend_rebuilds_a_session_in_a_used_slot_exactly(ref, backend_cache: Path) -> None:
    """``ModelRunner.rebuild`` over the onnxruntime backend (seek, replay of the last inputs, score sums) into a
    slot another session used: the next outputs and sums equal those of the session that never stopped, and
    a session in another slot is not touched. The live session itself matches the float64 parallel form."""
    from service.core.runner import ModelRunner

    def unpacked(packed: np.ndarray, n: int) -> np.ndarray:  # (B, L, nb) -> (L, B, n)
        return np.unpackbits(packed, axis=-1, bitorder="little")[..., :n].transpose(1, 0, 2)

    for name in ("sliding", "masked", "conv"):
        model = ref.models[name]
        r = model.net.replay_steps
        for t in (1, r + 3):
            x = torch.stack([ref.sequence(name, t + 1, seed=80 + t)], dim=1).float()  # (t + 1, 1, *input_shape)
            live = ModelRunner(_onnx_backend(model, 1, backend_cache))
            live.reset([0])
            spikes, scores = live.run([0], x[:t].numpy().tobytes(), t)
            want = model.net(x[:t].double())
            assert np.array_equal(unpacked(spikes, live.n_out), want.spikes.reshape(t, 1, -1).numpy()), (name, t)
            np.testing.assert_allclose(scores.transpose(1, 0, 2), want.scores.numpy(), rtol=1e-5, atol=1e-5)
            sums = live.score_sums(np.array([0]))
            back = ModelRunner(_onnx_backend(model, 3, backend_cache))
            back.reset([0, 1, 2])
            other = ref.sequence(name, 5, seed=99).unsqueeze(1).float()
            back.run([2], other.numpy().tobytes(), 5)  # slot 2 used by another session: windows, t, sums
            back.run([1], other.numpy().tobytes(), 5)  # slot 1: a session that goes on
            sums_1 = back.score_sums(np.array([1]))
            t0 = max(0, t - r)
            back.rebuild(np.array([2]), np.array([t0]), [x[t0:t].numpy().tobytes()], t - t0, sums)
            assert back.score_sums(np.array([1])).tolist() == sums_1.tolist(), (name, t)
            nxt = x[t:t + 1].numpy().tobytes()
            a, b = live.run([0], nxt, 1), back.run([2], nxt, 1)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), (name, t)
            assert back.score_sums(np.array([2])).tolist() == live.score_sums(np.array([0])).tolist(), (name, t)
            # the session in slot 1 goes on as if alone, also after slot 2 is reset for a new session
            back.reset([2])
            assert not back.score_sums(np.array([2])).any()
            assert back.score_sums(np.array([1])).tolist() == sums_1.tolist()
            assert back.score_sums(np.array([1])).dtype == back.sums_dtype  # what the journal logs them as
            more = ref.sequence(name, 1, seed=98).unsqueeze(1).float()
            c = back.run([1], more.numpy().tobytes(), 1)
            alone = model.net(torch.cat([other, more]).double())
            np.testing.assert_allclose(c[1].reshape(-1), alone.scores[-1, 0].numpy(), rtol=1e-5, atol=1e-5)


def test_onnx_backend_serves_the_folders_own_current_files_and_exports_once(model_dir: Path, tmp_path: Path) -> None:
    """A model folder with current ONNX files is served from them (nothing exported); one without is exported
    into the cache once: a second backend for it (the next start) reuses the files as they are."""
    import shutil

    from exported.onnx_export import export_model
    from model.folder import load_model_folder

    folder = shutil.copytree(model_dir / "sliding", tmp_path / "sliding")
    export_model(load_model_folder(folder), folder)
    cache = tmp_path / "cache"
    assert _onnx_backend(load_model_folder(folder, dtype=torch.float64), 2, cache).folder == folder
    assert not cache.exists()
    model = load_model_folder(model_dir / "masked", dtype=torch.float64)
    first = _onnx_backend(model, 2, cache).folder
    assert first.parent == cache and (first / PARALLEL_FILE).is_file() and (first / STEP_FILE).is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert _onnx_backend(model, 2, cache).folder == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps  # not exported again
    # another model of the same name (other weights) shares the cache without taking the first one's place
    make_model(tmp_path / "other" / "masked", *TINY["masked"], seed=7)
    second = _onnx_backend(load_model_folder(tmp_path / "other" / "masked", dtype=torch.float64), 2, cache).folder
    assert second != first and second.parent == cache
    assert _onnx_backend(model, 2, cache).folder == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps


@torch.no_grad()
def test_onnx_backend_exports_a_model_whose_onnx_file_does_not_parse(ref, model_dir: Path, tmp_path: Path) -> None:
    """A model folder whose model.onnx is cut short (or a Git LFS pointer) is served from a fresh export in
    the cache, with the model's answers, instead of the engine failing to start."""
    import shutil

    from model.folder import load_model_folder

    folder = shutil.copytree(model_dir / "sliding", tmp_path / "sliding")
    (folder / PARALLEL_FILE).write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    (folder / STEP_FILE).write_bytes(b"\x08\x08\x12")  # a truncated protobuf
    be = _onnx_backend(load_model_folder(folder, dtype=torch.float64), 1, tmp_path / "cache")
    assert be.folder.parent == tmp_path / "cache"
    x = ref.sequence("sliding", 7, seed=5).unsqueeze(1)
    be.reset(torch.tensor([0]))
    scores = be.run(x, torch.tensor([0]))[1]
    torch.testing.assert_close(scores.double(), ref.models["sliding"].net(x).scores, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_onnx_backend_of_a_model_that_cannot_stream_holds_no_slots(ref, backend_cache: Path) -> None:
    be = _onnx_backend(ref.models["full"], 8, backend_cache)
    assert be.max_slots == 0
    with pytest.raises(RuntimeError, match="'full' cannot stream: it has no session slots"):
        be.reset(torch.tensor([0]))
    x = ref.sequence("full", 6, seed=3).unsqueeze(1)
    spikes, scores = be.classify(x)
    want = ref.models["full"].net(x)
    assert torch.equal(spikes.double(), want.spikes)
    torch.testing.assert_close(scores.double(), want.scores, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_onnx_backend_classify_pads_a_masked_model_to_its_horizon(ref, backend_cache: Path) -> None:
    """model.onnx of a masked PSN takes exactly T steps: shorter inputs are padded and the answers cut back,
    equal to the parallel form over the real steps; exactly T steps need no padding."""
    be = _onnx_backend(ref.models["masked"], 2, backend_cache)
    for T in (1, 5, 24):
        x = torch.stack([ref.sequence("masked", T, seed=T), ref.sequence("masked", T, seed=T + 1)], dim=1)
        spikes, scores = be.classify(x)
        want = ref.models["masked"].net(x)
        assert spikes.shape == want.spikes.shape and torch.equal(spikes.double(), want.spikes), T
        torch.testing.assert_close(scores.double(), want.scores, rtol=1e-5, atol=1e-5)
