"""The backend contract of ``service/backends/base.py``, checked on the torch backend directly."""

from __future__ import annotations

import pytest
import torch

from service.backends import BACKENDS, get_backend_class
from tests.service.conftest import Reference


def test_registry() -> None:
    assert {"torch", "onnx"} <= set(BACKENDS)
    assert get_backend_class("torch").__name__ == "TorchBackend"
    assert get_backend_class("onnx").__name__ == "OnnxBackend"
    with pytest.raises(ValueError, match=r"PSN_BACKEND: unknown backend 'tensorrt'; known: \['onnx', 'torch'\]"):
        get_backend_class("tensorrt")


def test_run_over_scattered_slots_equals_parallel_form(ref: Reference) -> None:
    for name in ("sliding", "masked", "conv", "lif"):
        model = ref.models[name]
        be = get_backend_class("torch")(model, 8)
        slots = torch.tensor([5, 1, 6])  # not in order, not contiguous
        be.reset(slots)
        xs = [ref.sequence(name, 9, seed=50 + i) for i in range(3)]
        x = torch.stack(xs, dim=1)  # (9, 3, *input_shape)
        outs = [be.run(x[:2], slots), be.run(x[2:3], slots), be.run(x[3:9], slots)]  # chunks of 2, 1, 6
        spikes = torch.cat([o[0] for o in outs])
        scores = torch.cat([o[1] for o in outs])
        want = model.net(x)
        assert torch.equal(spikes, want.spikes), name
        torch.testing.assert_close(scores, want.scores, rtol=1e-12, atol=1e-12)
        # only the rows asked for move: slot 1 continues alone, slots 5 and 6 are untouched
        more = ref.sequence(name, 2, seed=60).unsqueeze(1)
        be.run(more, torch.tensor([1]))
        cont = be.run(x[:1, :1] * 0 + 1, torch.tensor([5]))[1]
        alone = model.net(torch.cat([xs[0], torch.ones(1, *xs[0].shape[1:], dtype=xs[0].dtype)]).unsqueeze(1))
        torch.testing.assert_close(cont[0, 0], alone.scores[-1, 0], rtol=1e-12, atol=1e-12)
        # reset gives a fresh session
        be.reset(torch.tensor([1]))
        again = be.run(x[:2, :1], torch.tensor([1]))
        assert torch.equal(again[0], want.spikes[:2, :1])


def test_classify_and_shapes(ref: Reference) -> None:
    model = ref.models["conv"]
    be = get_backend_class("torch")(model, 2)
    x = ref.sequence("conv", 5, seed=70).unsqueeze(1)
    spikes, scores = be.classify(x)
    assert spikes.shape == (5, 1, 7) and scores.shape == (5, 1, 4) and spikes.device.type == "cpu"
    assert get_backend_class("torch")(ref.models["full"], 4).max_slots == 0  # plain PSN: classify only


def test_a_sessions_outputs_do_not_depend_on_its_batch_float32(model_dir) -> None:
    """CPU, float32: session 0's spikes and state are bit-identical streamed alone one step at a time and
    inside batches of other sizes, other sessions and other chunk lengths (what a replay after a restart
    relies on), through the backend's gather / run / scatter, and after seek + replay of its last
    n(k-1) inputs the next outputs are identical too (issue 11)."""
    import random

    from model.folder import load_model_folder

    for name in ("sliding", "masked", "conv"):
        model = load_model_folder(model_dir / name, dtype=torch.float32)
        n, steps = 13, 20
        g = torch.Generator().manual_seed(7)
        x = torch.randn(steps + 1, n, *model.cfg.input_shape, generator=g) * 1.5
        alone = get_backend_class("torch")(model, 1)
        alone.reset(torch.tensor([0]))
        want = [alone.run(x[t:t + 1, :1], torch.tensor([0])) for t in range(steps)]
        be = get_backend_class("torch")(model, n)
        be.reset(torch.arange(n))
        rng, pos, got = random.Random(3), [0] * n, []
        while pos[0] < steps:
            L = min(rng.choice([1, 2, 3, 5]), steps - pos[0])
            members = [0] + [b for b in rng.sample(range(1, n), rng.randint(0, n - 1)) if pos[b] + L <= steps]
            rng.shuffle(members)
            sp, sc = be.run(torch.stack([x[pos[b]:pos[b] + L, b] for b in members], dim=1), torch.tensor(members))
            for i, b in enumerate(members):
                pos[b] += L
                if b == 0:
                    got.extend((sp[t:t + 1, i:i + 1], sc[t:t + 1, i:i + 1]) for t in range(L))
        assert all(torch.equal(g_[0], w[0]) for g_, w in zip(got, want, strict=True)), name
        for a, b in zip(alone._state.neurons, be._state.neurons, strict=True):
            assert torch.equal(a.window[0], b.window[0]), name
        # a replay: from zero windows at step steps - n(k-1), the last inputs again, then the score sum
        r = model.net.replay_steps
        fresh = get_backend_class("torch")(model, 2)
        fresh.seek(torch.tensor([1]), torch.tensor([steps - r]))
        fresh.replay(x[steps - r:steps, :1], torch.tensor([1]))  # each layer only where the next one reads it
        fresh.set_score_sums(torch.tensor([1]), alone.score_sums(torch.tensor([0])))
        nxt = x[steps:steps + 1, :1]
        a, b = alone.run(nxt, torch.tensor([0])), fresh.run(nxt, torch.tensor([1]))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), name


def test_a_rebuilt_session_in_a_used_slot_continues_exactly(ref: Reference) -> None:
    """``ModelRunner.rebuild`` (seek, replay of the last inputs, score sums) into a slot another session used
    before: the next outputs equal those of the session that never stopped, bit for bit. Sessions older and
    younger than the receptive field (a young one is replayed from step 0 over its zero windows), one of a
    single step among them."""
    import numpy as np

    from service.core.runner import ModelRunner

    for name in ("sliding", "masked", "conv"):
        model = ref.models[name]
        r = model.net.replay_steps
        for t in (1, 2, r + 3):
            x = torch.stack([ref.sequence(name, t + 1, seed=80 + t)], dim=1)  # (t + 1, 1, *input_shape)
            live = ModelRunner(get_backend_class("torch")(model, 1))
            live.reset([0])
            live.run([0], x[:t].numpy().tobytes(), t)
            sums = live.score_sums(np.array([0]))
            back = ModelRunner(get_backend_class("torch")(model, 3))
            back.reset([0, 1, 2])
            other = ref.sequence(name, 5, seed=99).unsqueeze(1)
            back.run([2], other.numpy().tobytes(), 5)  # slot 2 used by another session: windows, t, sums
            t0 = max(0, t - r)
            back.rebuild(np.array([2]), np.array([t0]), [x[t0:t].numpy().tobytes()], t - t0, sums)
            nxt = x[t:t + 1].numpy().tobytes()
            a, b = live.run([0], nxt, 1), back.run([2], nxt, 1)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), (name, t)
            assert back.score_sums(np.array([2])).tolist() == live.score_sums(np.array([0])).tolist(), (name, t)
