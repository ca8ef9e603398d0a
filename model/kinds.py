"""What each neuron kind can do, in one place: every "is this a masked or PSN model?" question asks here.

| kind | horizon T | steps (streams) | any T in parallel form | order k | causal |
| --- | --- | --- | --- | --- | --- |
| sliding PSN | no | yes | yes | yes | yes |
| masked PSN | yes, at most T steps | yes | no (its T) | yes | yes |
| PSN | yes, exactly T steps | no | no (its T) | no | no (each step reads the whole sequence) |
| LIF | no | yes | yes | no | yes |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NeuronKind:
    name: str  # the config value ("sliding", ...)
    label: str  # for people: model cards, plots
    horizon: bool  # needs a fixed T: per-step weights, so a sequence may not be longer than T
    exact_T: bool  # needs exactly T steps (the plain PSN): shorter inputs are refused too
    streams: bool  # has a step form over a fixed-size state
    dynamic_T: bool  # its parallel form (and model.onnx) takes any number of steps
    has_k: bool  # the order k of a masked / sliding PSN applies
    causal: bool  # the output at step t never reads later inputs, so padding after a sequence is harmless


KINDS: dict[str, NeuronKind] = {
    "masked": NeuronKind("masked", "masked PSN", horizon=True, exact_T=False, streams=True, dynamic_T=False,
                         has_k=True, causal=True),
    "sliding": NeuronKind("sliding", "sliding PSN", horizon=False, exact_T=False, streams=True, dynamic_T=True,
                          has_k=True, causal=True),
    "psn": NeuronKind("psn", "PSN", horizon=True, exact_T=True, streams=False, dynamic_T=False, has_k=False,
                      causal=False),
    "lif": NeuronKind("lif", "LIF", horizon=False, exact_T=False, streams=True, dynamic_T=True, has_k=False,
                      causal=True),
}
NEURONS = tuple(KINDS)
STREAMING_NEURONS = tuple(name for name, kind in KINDS.items() if kind.streams)


def kind(name: str) -> NeuronKind:
    """The capabilities of neuron kind ``name``; ``ValueError`` for an unknown one."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"neuron: expected one of {NEURONS}, got {name!r}") from None


__all__ = ["NeuronKind", "KINDS", "NEURONS", "STREAMING_NEURONS", "kind"]
