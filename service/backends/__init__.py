"""Backend registry: ``PSN_BACKEND`` names one of these (see ``base.py`` for the interface).

Entries are ``"module:Class"`` strings, imported only when selected (so a backend's heavy or optional
dependencies are not loaded otherwise). Adding a runtime = one file + one line here.
"""

from __future__ import annotations

import importlib

from service.backends.base import Backend, BackendClass
from service.config import BadSetting

BACKENDS: dict[str, str] = {
    "torch": "service.backends.torch_backend:TorchBackend",
    "onnx": "service.backends.onnx:OnnxBackend",
}


def get_backend_class(name: str) -> BackendClass:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise BadSetting(f"PSN_BACKEND: unknown backend {name!r}; known: {sorted(BACKENDS)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Backend", "BackendClass", "BACKENDS", "get_backend_class"]
