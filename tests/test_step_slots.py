"""``PSNNet.step_slots_exact_`` (the CPU backend's one-step path): the slot table updated in place equals
``chunk`` of one step on the gathered rows with the new state scattered back, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from model.folder import load_model_folder
from model.functional import NeuronState, band_sum, window_band_sum
from model.network import LayerConfig, NetConfig, NetState, PSNNet
from service.backends.torch_backend import TorchBackend

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 3, 16, 17, 40)


def bench_net() -> PSNNet:
    """bench/engine.py's ``bench_model``: 28-128-128-10 sliding PSN, k = 8, untrained, batch norm folded."""
    torch.manual_seed(0)
    cfg = NetConfig(input_shape=(28,), num_classes=10, layers=(LayerConfig(out=128), LayerConfig(out=128)),
                    neuron="sliding", k=8)
    return PSNNet(cfg).eval().fused()


@torch.no_grad()
def cancelling_net(threshold: float = 0.5) -> PSNNet:
    """A net whose spikes show the band sum's order and its bias: the first layer passes its inputs through
    (identity weights, no batch norm), its neurons add the last 8 of them with weight 1, threshold 0.5. Inputs of +-2^24
    and +-1 make the float32 sum depend on the order of the adds: (2^24 + 1) - 2^24 = 0 but (2^24 - 2^24) + 1
    = 1, and a spike then tells them apart. ``threshold`` 0: the sums are often exactly 0, where a neuron spikes
    (H >= 0)."""
    torch.manual_seed(1)
    cfg = NetConfig(input_shape=(24,), num_classes=4, neuron="sliding", k=8,
                    layers=(LayerConfig(out=24, batch_norm=False), LayerConfig(out=12)))
    net = PSNNet(cfg).eval()
    first = net.layers[0]
    first.op.weight.copy_(torch.eye(24))
    first.op.bias.zero_()
    first.neuron.weight.fill_(1.0)
    first.neuron.bias.fill_(-threshold)
    net.layers[1].neuron.bias.fill_(0.0)
    return net


def cancelling_inputs(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    values = torch.tensor([-2.0 ** 24, -1.0, 0.0, 1.0, 2.0 ** 24])
    return values[torch.randint(0, 5, shape, generator=g)]


def _gather(state: NetState, idx: Tensor) -> NetState:
    return NetState(tuple(NeuronState(ns.window[idx], ns.t[idx]) for ns in state.neurons),
                    state.score_sum[idx], state.t[idx])


def _scatter_(state: NetState, idx: Tensor, new: NetState) -> None:
    for ns, ns_new in zip(state.neurons, new.neurons, strict=True):
        ns.window[idx], ns.t[idx] = ns_new.window, ns_new.t
    state.score_sum[idx], state.t[idx] = new.score_sum, new.t


def _clone(state: NetState) -> NetState:
    return NetState(tuple(NeuronState(ns.window.clone(), ns.t.clone()) for ns in state.neurons),
                    state.score_sum.clone(), state.t.clone())


# smnist: a conv layer; cancelling-at-0: membranes exactly 0
@pytest.mark.parametrize("name", ["mnist1d-sliding", "smnist-sliding", "bench", "cancelling", "cancelling-at-0"])
def test_in_place_step_equals_chunk_on_gathered_rows(name: str) -> None:
    """Many consecutive steps of batches of 1, 3, 16, 17 and 40 rows in random slot order, slots at step
    counts up to 2^26 (past 2^24 a float32 step count rounds: the scores must divide as ``chunk`` does):
    spikes, scores and the whole slot table (windows, step counts, score sums) equal, bit for bit."""
    if name.startswith("cancelling"):
        net, draw = cancelling_net(0.0 if name.endswith("at-0") else 0.5), cancelling_inputs
    else:
        net = bench_net() if name == "bench" else load_model_folder(ROOT / "exported" / name).net
        scale = 3.0 if name == "bench" else 1.5  # the bench net's untrained layers spike little otherwise

        def draw(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
            return torch.randn(shape, generator=g) * scale
    g = torch.Generator().manual_seed(3)
    S, steps, shape = 64, 60, net.cfg.input_shape
    with torch.no_grad():
        want = net.initial_state(S)
        start = torch.where(torch.rand(S, generator=g) < 0.5, 0, torch.randint(0, 2 ** 26, (S,), generator=g))
        for ns in (*want.neurons, want):
            ns.t.copy_(start)
        got = _clone(want)
        spiked = 0.0
        for step in range(steps):
            B = BATCHES[step % len(BATCHES)]
            idx = torch.randperm(S, generator=g)[:B]
            x = draw((B, *shape), g)
            out, new = net.chunk(x.unsqueeze(0), _gather(want, idx))
            _scatter_(want, idx, new)
            fast = net.step_slots_exact_(x, got, idx)
            assert torch.equal(fast.spikes, out.spikes[0]), step
            assert torch.equal(fast.scores, out.scores[0]), step
            spiked += float(fast.spikes.mean()) / steps
    assert 0.02 < spiked < 0.9
    for a, b in zip(got.neurons, want.neurons, strict=True):
        assert torch.equal(a.window, b.window) and torch.equal(a.t, b.t)
    assert torch.equal(got.score_sum, want.score_sum) and torch.equal(got.t, want.t)


def test_window_band_sum_is_band_sum_of_one_step() -> None:
    """The same float as ``band_sum`` (L = 0) in every element, for any k, feature shape and dtype."""
    g = torch.Generator().manual_seed(4)
    for k, features, dtype in ((1, (5,), torch.float32), (2, (7,), torch.float64), (8, (3, 6), torch.float32),
                               (5, (33,), torch.bfloat16)):
        rows = (torch.randn(19, k, *features, generator=g) * 3).to(dtype)  # (B, k, *features)
        weight = torch.randn(k, generator=g).to(dtype)
        want = band_sum(rows.transpose(0, 1), list(weight.unbind(0)), 0)
        assert torch.equal(window_band_sum(rows, weight), want), (k, dtype)
        assert torch.equal(window_band_sum(rows, weight, out=torch.empty_like(rows)), want), (k, dtype)


def test_the_cpu_backend_steps_a_sliding_net_in_place() -> None:
    """``TorchBackend.run`` of one step takes ``step_slots_exact_`` for a sliding-PSN net on the CPU (a masked
    one keeps gather, chunk, scatter; so does a call of two steps), and answers what the chunk path answers."""
    sliding = load_model_folder(ROOT / "exported" / "mnist1d-sliding")
    assert not TorchBackend(load_model_folder(ROOT / "exported" / "mnist1d-masked"), 4)._exact_step
    fast, ref = TorchBackend(sliding, 4), TorchBackend(sliding, 4)
    assert fast._exact_step
    ref._exact_step = False  # the chunk path
    calls = []  # the same bits either way: only which path ran tells them apart
    exact = sliding.net.step_slots_exact_

    def spy(x_t: Tensor, state: NetState, idx: Tensor):
        calls.append(state is fast._state)
        return exact(x_t, state, idx)

    sliding.net.step_slots_exact_ = spy
    g = torch.Generator().manual_seed(5)
    try:
        for slots in ([3, 1], [0, 1, 2, 3], [1]):
            x, idx = torch.randn(1, len(slots), *sliding.cfg.input_shape, generator=g), torch.tensor(slots)
            for a, b in zip(fast.run(x, idx), ref.run(x, idx), strict=True):
                assert torch.equal(a, b)
        assert calls == [True] * 3  # each one-step call of ``fast``, none of ``ref``
        fast.run(torch.randn(2, 1, *sliding.cfg.input_shape, generator=g), torch.tensor([0]))
        assert len(calls) == 3  # two steps: the chunk path
    finally:
        del sliding.net.step_slots_exact_
