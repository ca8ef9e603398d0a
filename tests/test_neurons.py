"""The PSN family against float64 loops from the paper, and step == chunk == parallel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model import LIF, PSN, HorizonError, InputError, MaskedPSN, SlidingPSN, mask_schedule
from model.functional import band_mask, lif_scan, relaxed_mask, sliding_matrix
from model.surrogate import arctan_surrogate_grad
from tests.reference import lif_loop, masked_loop, psn_loop, sliding_loop

TIE = 1e-4  # |H| below this may flip in float32; spikes are compared away from it


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test draws its inputs from a fixed seed: the same data on every run."""
    torch.manual_seed(1234)


def _randomise(neuron: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in neuron.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if name == "bias" else 0.7))


def _assert_matches(s: torch.Tensor, h: torch.Tensor, s_ref: np.ndarray, h_ref: np.ndarray) -> None:
    h = h.detach().double().numpy().reshape(h_ref.shape)
    s = s.detach().double().numpy().reshape(s_ref.shape)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
    away = np.abs(h_ref) > TIE
    assert away.mean() > 0.9
    np.testing.assert_array_equal(s[away], s_ref[away])
    assert 0 < s_ref.mean() < 1  # both spikes and silence are tested


@pytest.mark.parametrize("T,N", [(1, 64), (8, 5), (33, 17), (64, 2)])
def test_psn_matches_paper_loop(T: int, N: int) -> None:
    neuron = PSN(T)
    _randomise(neuron, T)
    x = torch.randn(T, N)
    s_ref, h_ref = psn_loop(x.double().numpy(), neuron.weight.double().detach().numpy(),
                            neuron.bias.double().detach().numpy())
    _assert_matches(neuron(x), neuron.membrane(x), s_ref, h_ref)


@pytest.mark.parametrize("k,T,shape", [(1, 5, (4,)), (3, 8, (2, 3)), (4, 32, (6,)), (8, 8, (3,)), (16, 64, (2, 2))])
def test_masked_psn_matches_paper_loop(k: int, T: int, shape: tuple[int, ...]) -> None:
    neuron = MaskedPSN(k, T)
    _randomise(neuron, k * T)
    x = torch.randn(T, *shape)
    s_ref, h_ref = masked_loop(x.double().reshape(T, -1).numpy(), neuron.weight.double().detach().numpy(),
                               neuron.bias.double().detach().numpy(), k)
    _assert_matches(neuron(x), neuron.membrane(x), s_ref, h_ref)


@pytest.mark.parametrize("k,T,shape", [(1, 6, (4, 8)), (2, 8, (3, 2)), (5, 33, (7,)), (8, 64, (5,)), (12, 9, (3,))])
def test_sliding_psn_matches_paper_loop(k: int, T: int, shape: tuple[int, ...]) -> None:
    neuron = SlidingPSN(k)
    _randomise(neuron, k + T)
    x = torch.randn(T, *shape)
    s_ref, h_ref = sliding_loop(x.double().reshape(T, -1).numpy(), neuron.weight.double().detach().numpy(),
                                float(neuron.bias.detach()))
    _assert_matches(neuron(x), neuron.membrane(x), s_ref, h_ref)


def test_lif_matches_loop() -> None:
    x = torch.rand(20, 4, 3) * 2.5
    s = LIF(tau=2.0, v_threshold=1.0)(x)
    ref = lif_loop(x.double().numpy(), 2.0, 1.0)
    np.testing.assert_array_equal(s.numpy(), ref)
    assert 0 < ref.mean() < 1


def test_paper_initialisations() -> None:
    sp = SlidingPSN(4)
    np.testing.assert_allclose(sp.weight.detach().numpy(), [0.125, 0.25, 0.5, 1.0])
    assert float(sp.bias.detach()) == -1.0  # threshold 1
    assert torch.all(MaskedPSN(2, 6).bias == -1.0) and torch.all(PSN(6).bias == -1.0)
    assert tuple(PSN(6).weight.shape) == (6, 6) and tuple(MaskedPSN(2, 6).weight.shape) == (6, 6)


def test_sliding_matrix_is_banded_toeplitz() -> None:
    w = torch.tensor([0.1, 0.2, 0.3])
    M = sliding_matrix(w, 6)
    for t in range(6):
        for i in range(6):
            expected = float(w[2 - (t - i)]) if 0 <= t - i < 3 else 0.0
            assert float(M[t, i]) == pytest.approx(expected)


def test_mask_relaxation_and_schedule() -> None:
    m = band_mask(2, 4)
    assert m.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    r = relaxed_mask(2, 4, 0.25)
    np.testing.assert_allclose(r.numpy(), 0.25 * m.numpy() + 0.75)
    assert mask_schedule(0.0) == 0.0 and mask_schedule(1 / 16) == pytest.approx(0.5)
    assert mask_schedule(0.125) == 1.0 and mask_schedule(0.9) == 1.0
    assert mask_schedule(0.25, reach=0.5) == pytest.approx(0.5)
    # lam < 1 lets future inputs in (the relaxed mask is dense), lam = 1 does not
    neuron = MaskedPSN(2, 6)
    _randomise(neuron, 1)
    x = torch.randn(6, 50)
    x2 = x.clone()
    x2[5] += 3.0
    neuron.lam = 0.5
    assert not torch.equal(neuron.membrane(x)[0], neuron.membrane(x2)[0])
    neuron.lam = 1.0
    assert torch.equal(neuron.membrane(x)[:5], neuron.membrane(x2)[:5])


def _stream_all_ways(neuron, x: torch.Tensor, splits: list[int]):
    B, feat = x.shape[1], tuple(x.shape[2:])
    state = neuron.initial_state(B, feat, dtype=x.dtype)
    steps = []
    for x_t in x:
        s, state = neuron.step(x_t, state)
        steps.append(s)
    state = neuron.initial_state(B, feat, dtype=x.dtype)
    chunks, start = [], 0
    for L in splits:
        s, state = neuron.chunk(x[start:start + L], state)
        chunks.append(s)
        start += L
    assert start == x.shape[0]
    return torch.stack(steps), torch.cat(chunks), state


@pytest.mark.parametrize("make", [lambda: MaskedPSN(3, 13), lambda: SlidingPSN(5), lambda: SlidingPSN(1),
                                  lambda: MaskedPSN(13, 13), lambda: LIF(), lambda: SlidingPSN(2),
                                  lambda: MaskedPSN(2, 13)])
def test_step_equals_chunk_equals_parallel(make) -> None:
    neuron = make().double()
    _randomise(neuron, 7) if not isinstance(neuron, LIF) else None
    x = torch.randn(13, 4, 3, 2, dtype=torch.float64) * 2
    parallel = neuron(x)
    steps, chunks, state = _stream_all_ways(neuron, x, [1, 5, 2, 4, 1])
    assert torch.equal(steps, parallel) and torch.equal(chunks, parallel)
    with torch.no_grad():  # as served: the band sum's in-place path (with autograd it runs out of place)
        steps, chunks, _ = _stream_all_ways(neuron, x, [1, 5, 2, 4, 1])
    assert torch.equal(steps, parallel) and torch.equal(chunks, parallel)
    assert 0 < parallel.mean() < 1
    assert state.t.tolist() == [13] * 4


def test_masked_rows_at_different_steps_share_a_batch() -> None:
    """Sessions in one batch may be at different t: each row uses its own weight row."""
    neuron = MaskedPSN(3, 10).double()
    _randomise(neuron, 3)
    x = torch.randn(10, 2, 5, dtype=torch.float64)
    ref = neuron(x)
    st_a = neuron.initial_state(1, (5,))
    _, st_a = neuron.chunk(x[:4, :1], st_a)  # row 0 at t=4
    st_b = neuron.initial_state(1, (5,))  # row 1 at t=0
    joint = type(st_a)(torch.cat([st_a.window, st_b.window]), torch.cat([st_a.t, st_b.t]))
    x_next = torch.stack([x[4:7, 0], x[0:3, 1]], dim=1)  # (3, 2, 5)
    s, joint = neuron.chunk(x_next, joint)
    assert torch.equal(s[:, 0], ref[4:7, 0]) and torch.equal(s[:, 1], ref[0:3, 1])
    assert joint.t.tolist() == [7, 3]


@pytest.mark.parametrize("make", [lambda: MaskedPSN(4, 20), lambda: SlidingPSN(4)])
def test_causality(make) -> None:
    neuron = make()
    _randomise(neuron, 11)
    x = torch.randn(20, 64)
    for t in (0, 7, 18):
        x2 = x.clone()
        x2[t + 1:] = torch.randn(19 - t, 64) * 5
        assert torch.equal(neuron.membrane(x)[: t + 1], neuron.membrane(x2)[: t + 1])
        assert not torch.equal(neuron.membrane(x)[t + 1:], neuron.membrane(x2)[t + 1:])


def test_full_psn_is_not_causal() -> None:
    neuron = PSN(10)
    _randomise(neuron, 2)
    x = torch.randn(10, 8)
    x2 = x.clone()
    x2[9] += 1.0
    assert not torch.equal(neuron.membrane(x)[0], neuron.membrane(x2)[0])
    assert not hasattr(neuron, "step")


@pytest.mark.parametrize("make", [lambda: MaskedPSN(3, 9), lambda: SlidingPSN(3), lambda: PSN(9)])
def test_batch_rows_are_independent(make) -> None:
    neuron = make()
    _randomise(neuron, 5)
    x = torch.randn(9, 6, 4)
    x2 = x.clone()
    x2[:, 2] = torch.randn(9, 4) * 10
    a, b = neuron.membrane(x), neuron.membrane(x2)
    keep = [0, 1, 3, 4, 5]
    assert torch.equal(a[:, keep], b[:, keep])
    if hasattr(neuron, "step"):
        sa, sb = neuron.initial_state(6, (4,)), neuron.initial_state(6, (4,))
        for t in range(9):
            oa, sa = neuron.step(x[t], sa)
            ob, sb = neuron.step(x2[t], sb)
            assert torch.equal(oa[keep], ob[keep])


@pytest.mark.parametrize("alpha", [2.0, 4.0])
def test_surrogate_gradient_is_the_arctan_derivative(alpha: float) -> None:
    """dL/dx_i = sum_t c_t g'(H_t) W[t, i] for L = sum_t c_t S_t (one neuron, T = 5)."""
    neuron = MaskedPSN(3, 5, alpha=alpha).double()
    _randomise(neuron, 9)
    x = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, 1, dtype=torch.float64)
    (neuron(x) * c).sum().backward()
    W = (neuron.weight * band_mask(3, 5, dtype=torch.float64)).detach().numpy()
    h = neuron.membrane(x.detach()).detach().numpy()[:, 0]
    gprime = np.array([alpha / (2 * (1 + (math.pi / 2 * alpha * v) ** 2)) for v in h])
    expected = (c.numpy()[:, 0] * gprime) @ W
    np.testing.assert_allclose(x.grad.numpy()[:, 0], expected, rtol=1e-10)
    np.testing.assert_allclose(arctan_surrogate_grad(torch.tensor(h), alpha).numpy(), gprime)
    # and the weights get a gradient too: dL/dW[t, i] = c_t g'(H_t) x_i on the band
    gw = neuron.weight.grad.numpy()
    np.testing.assert_allclose(gw, np.outer(c.numpy()[:, 0] * gprime, x.detach().numpy()[:, 0]) * (W != 0), rtol=1e-10)


def test_sliding_weights_get_gradients() -> None:
    neuron = SlidingPSN(3)
    x = torch.randn(12, 16)
    neuron(x).sum().backward()
    assert neuron.weight.grad is not None and neuron.weight.grad.abs().sum() > 0
    assert neuron.bias.grad is not None


def test_bad_inputs_are_named() -> None:
    m, s = MaskedPSN(2, 4), SlidingPSN(2)
    with pytest.raises(InputError, match="floating-point"):
        s(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(InputError, match="NaN or Inf"):
        s(torch.tensor([[1.0], [float("nan")]]))
    with pytest.raises(InputError, match="NaN or Inf"):
        m.step(torch.tensor([float("inf")]), m.initial_state(1))
    with pytest.raises(InputError, match="expected a torch.Tensor"):
        s([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(HorizonError, match="T=4"):
        m(torch.randn(5, 2))
    with pytest.raises(InputError, match="T=6"):
        PSN(6)(torch.randn(5, 2))
    with pytest.raises(InputError, match=r"state.window: expected shape \(2, 2, 3\)"):
        s.step(torch.randn(2, 3), s.initial_state(2, (4,)))
    with pytest.raises(ValueError, match="k <= T"):
        MaskedPSN(5, 4)
    # stepping past the horizon names T and leaves the given state untouched
    st = m.initial_state(1, (3,))
    _, st = m.chunk(torch.randn(4, 1, 3), st)
    with pytest.raises(HorizonError, match="T=4"):
        m.step(torch.randn(1, 3), st)
    assert st.t.tolist() == [4]
    with pytest.raises(HorizonError, match="T=4"):
        m.chunk(torch.randn(5, 1, 3), m.initial_state(1, (3,)))
    m.lam = 0.5
    with pytest.raises(InputError, match="lam=0.5"):
        m.step(torch.randn(1, 3), m.initial_state(1, (3,)))


def test_banded_weights_are_the_band_of_the_matrix() -> None:
    """band_weight(T) holds exactly the nonzeros of effective_weight(T), in the kernel's order."""
    T, k = 12, 4
    for neuron in (MaskedPSN(k, T), SlidingPSN(k, exp_init=False)):
        band = neuron.band_weight(T).detach()
        band = band.expand(T, k) if band.dim() == 1 else band
        dense = torch.zeros(T, T)
        for t in range(T):
            for j in range(k):
                if t - k + 1 + j >= 0:
                    dense[t, t - k + 1 + j] = band[t, j]
        assert torch.equal(dense, neuron.effective_weight(T).detach())


def test_masked_band_cache_follows_weight_updates() -> None:
    """Without autograd the masked PSN caches its band; an in-place weight update must not leave it stale."""
    T, k = 6, 3
    neuron = MaskedPSN(k, T)
    with torch.no_grad():
        first = neuron.band_weight(T).clone()
        assert neuron.band_weight(T) is neuron.band_weight(T)  # cached
        neuron.weight.mul_(2.0)  # as an optimiser step or load_state_dict would
        torch.testing.assert_close(neuron.band_weight(T), 2.0 * first)
        assert neuron.band_weight(T - 2).shape == (T - 2, k)
    with pytest.raises(HorizonError, match=f"T={T}"):
        neuron.band_weight(T + 1)
    neuron.lam = 0.5
    assert neuron.band_weight(T) is None  # a relaxed mask is not banded


@pytest.mark.parametrize("block", [None, 500], ids=["unblocked", "blocked"])
@pytest.mark.parametrize("kind", ["sliding", "masked"])
def test_step_form_membrane_is_bit_identical_across_chunks_and_batches(kind: str, block: int | None,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``H`` of one session, float32: one step at a time alone == chunks of any length inside batches
    of other sessions at other step counts (the fixed-order ``band_sum``, also when it runs in blocks
    of sessions), bit for bit. A replayed session after a restart depends on it (issue 11); spikes
    alone would show a difference rarely."""
    import random

    import model.functional

    if block is not None:
        monkeypatch.setattr(model.functional, "BAND_BLOCK", block)  # blocks of 1-2 sessions here

    from model.functional import NeuronState, masked_chunk, masked_step, sliding_chunk, sliding_step

    k, T, n, N = 6, 48, 9, 200
    g = torch.Generator().manual_seed(3)
    w = torch.randn(T, T, generator=g) if kind == "masked" else torch.randn(k, generator=g)
    bias = torch.randn(T, generator=g) if kind == "masked" else torch.tensor(0.1)
    x = torch.randn(T, n, N, generator=g)

    def step(x_t, st):
        return masked_step(x_t, st, w, bias, k, 2.0) if kind == "masked" else sliding_step(x_t, st, w, bias, 2.0)

    def chunk(xc, st):
        return masked_chunk(xc, st, w, bias, k, 2.0) if kind == "masked" else sliding_chunk(xc, st, w, bias, 2.0)

    def zero(b: int) -> NeuronState:
        return NeuronState(torch.zeros(b, k, N), torch.zeros(b, dtype=torch.long))

    st, alone = zero(1), []
    for t in range(T):
        _, h, st = step(x[t, :1], st)
        alone.append(h[0])
    alone_h = torch.stack(alone)
    rng = random.Random(0)
    states, pos, got = [zero(1) for _ in range(n)], [0] * n, []
    while pos[0] < T:
        L = min(rng.choice([1, 2, 3, 7, 11]), T - pos[0])
        members = [0] + [b for b in rng.sample(range(1, n), rng.randint(0, n - 1)) if pos[b] + L <= T]
        rng.shuffle(members)
        st = NeuronState(torch.cat([states[b].window for b in members]), torch.cat([states[b].t for b in members]))
        xb = torch.stack([x[pos[b]:pos[b] + L, b] for b in members], dim=1)
        _, h, new = chunk(xb, st)
        for i, b in enumerate(members):
            states[b], pos[b] = NeuronState(new.window[i:i + 1], new.t[i:i + 1]), pos[b] + L
            if b == 0:
                got.append(h[:, i])
    assert torch.equal(torch.cat(got), alone_h)


def _dyadic(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Inputs from {0, 0.5, 1, 1.5, 2}: with weights and biases of halves, every H is exact in float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, shape, generator=g).to(torch.float32) / 2


@pytest.mark.parametrize("kind", ["sliding", "masked"])
def test_a_membrane_of_exactly_zero_spikes_in_every_form(kind: str) -> None:
    """Heaviside(0) = 1 (the paper's S = H >= 0): where H is exactly 0 the neuron spikes, in the parallel
    form, with autograd (the surrogate's forward), one step at a time and in chunks, as the float64 loop
    says. Random inputs never hit H = 0 exactly, so these inputs and weights make the ties on purpose."""
    k, T = 2, 12
    neuron = SlidingPSN(k) if kind == "sliding" else MaskedPSN(k, T)
    with torch.no_grad():
        neuron.weight.fill_(0.5)
        neuron.bias.fill_(-1.0)
    x = _dyadic((T, 3, 5), seed=4)
    x2 = x.reshape(T, -1).double().numpy()
    if kind == "sliding":
        s_ref, h_ref = sliding_loop(x2, neuron.weight.detach().double().numpy(), -1.0)
    else:
        W, b = neuron.weight.detach().double().numpy(), neuron.bias.detach().double().numpy()
        s_ref, h_ref = masked_loop(x2, W, b, k)
    assert (h_ref == 0).mean() > 0.1 and (h_ref > 0).any() and (h_ref < 0).any()
    want = torch.from_numpy(s_ref).float().reshape(x.shape)
    with torch.no_grad():
        assert torch.equal(neuron(x), want)
        steps, chunks, _ = _stream_all_ways(neuron, x, [3, 1, 8])
    assert torch.equal(steps, want) and torch.equal(chunks, want)
    assert torch.equal(neuron(x.clone().requires_grad_(True)).detach(), want)  # through the surrogate


def test_lif_at_exactly_the_threshold_spikes_in_every_form() -> None:
    """v = v_th exactly is a spike (s = v - v_th >= 0) for LIF's loop, its step form and ``lif_scan``."""
    x = _dyadic((10, 4, 6), seed=5) * 2  # {0, 1, 2, 3, 4}: with tau = 2 every v is a short binary fraction
    ref = lif_loop(x.double().numpy(), 2.0, 1.0)
    v = np.zeros(x.shape[1:])
    ties = 0
    for x_t in x.double().numpy():  # count the exact ties the reference meets
        v = v + (x_t - v) / 2.0
        ties += int((v == 1.0).sum())
        v = v * (1 - (v >= 1.0))
    assert ties > 5 and 0 < ref.mean() < 1
    neuron = LIF(tau=2.0, v_threshold=1.0)
    want = torch.from_numpy(ref).float()
    assert torch.equal(neuron(x), want)
    assert torch.equal(neuron(x.clone().requires_grad_(True)).detach(), want)
    steps, chunks, _ = _stream_all_ways(neuron, x, [4, 6])
    assert torch.equal(steps, want) and torch.equal(chunks, want)
    assert torch.equal(lif_scan(x, 2.0, 1.0)[0], want)


def test_a_masked_psn_over_fewer_than_T_steps_is_the_prefix_of_the_paper_loop() -> None:
    """T' < T steps use the first T' rows of W and the first T' biases (causal: a prefix is exact)."""
    k, T, Tp = 3, 10, 6
    neuron = MaskedPSN(k, T)
    _randomise(neuron, 21)
    x = torch.randn(Tp, 40)
    W, b = neuron.weight.detach().double().numpy(), neuron.bias.detach().double().numpy()
    s_ref, h_ref = masked_loop(x.double().numpy(), W[:Tp, :Tp], b[:Tp], k)
    _assert_matches(neuron(x), neuron.membrane(x), s_ref, h_ref)
    state = neuron.initial_state(40)
    s, _ = neuron.chunk(x, state)
    away = np.abs(h_ref) > TIE
    np.testing.assert_array_equal(s.detach().double().numpy()[away], s_ref[away])


def test_the_horizon_counts_the_furthest_row_of_a_batch() -> None:
    """Rows of one batch at different steps: the one at the horizon refuses the call (HorizonError), even
    though the other row could still step."""
    m = MaskedPSN(2, 4)
    _, done = m.chunk(torch.randn(4, 1, 3), m.initial_state(1, (3,)))
    fresh = m.initial_state(1, (3,))
    for rows in ((done, fresh), (fresh, done)):
        joint = type(done)(torch.cat([r.window for r in rows]), torch.cat([r.t for r in rows]))
        with pytest.raises(HorizonError, match="T=4"):
            m.step(torch.randn(2, 3), joint)
        with pytest.raises(HorizonError, match="T=4"):
            m.chunk(torch.randn(1, 2, 3), joint)
    m.step(torch.randn(1, 3), fresh)  # the fresh row alone still steps


def test_chunk_and_lif_check_their_inputs_as_step_does() -> None:
    s, m = SlidingPSN(2), MaskedPSN(2, 4)
    for neuron in (s, m, LIF()):
        with pytest.raises(InputError, match="NaN or Inf"):
            neuron.chunk(torch.tensor([[[1.0], [float("nan")]]]), neuron.initial_state(2, (1,)))
        with pytest.raises(InputError, match="at least 2 dimensions"):
            neuron.chunk(torch.randn(3), neuron.initial_state(1))
        with pytest.raises(InputError, match=r"state.window: expected shape \(2, \d, 3\)"):
            neuron.chunk(torch.randn(3, 2, 3), neuron.initial_state(2, (4,)))
    with pytest.raises(InputError, match="NaN or Inf"):
        LIF()(torch.tensor([[1.0], [float("inf")]]))
    with pytest.raises(InputError, match="floating-point"):
        LIF()(torch.ones(4, 3, dtype=torch.long))


def test_a_cached_band_is_not_handed_out_when_autograd_wants_one() -> None:
    """The band cached by an inference call must not be returned under autograd: the band's gradient
    reaches exactly the weights inside the mask, t-k < i <= t."""
    T, k = 6, 3
    neuron = MaskedPSN(k, T)
    with torch.no_grad():
        neuron.band_weight(T)
    band = neuron.band_weight(T)
    assert band.requires_grad
    band.sum().backward()
    want = torch.tensor([[1.0 if t - k < i <= t else 0.0 for i in range(T)] for t in range(T)])
    assert torch.equal(neuron.weight.grad, want)


def test_mask_schedule_accepts_a_reach_of_the_whole_run() -> None:
    assert mask_schedule(0.5, reach=1.0) == pytest.approx(0.5) and mask_schedule(1.0, reach=1.0) == 1.0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="reach"):
            mask_schedule(0.5, reach=bad)
