"""The PSN family (arXiv 2304.12760) in PyTorch: neurons, networks, training, model folders."""

from model.checks import HorizonError, InputError
from model.functional import NeuronState
from model.neurons import LIF, PSN, MaskedPSN, SlidingPSN, mask_schedule

__all__ = ["PSN", "MaskedPSN", "SlidingPSN", "LIF", "NeuronState", "mask_schedule", "InputError",
           "HorizonError"]
