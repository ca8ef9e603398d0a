"""Backend registry: ``PSN_BACKEND`` names one of these (see ``base.py`` for the interface)."""

from __future__ import annotations

from service.backends.base import Backend, BackendClass
from service.backends.torch_backend import TorchBackend

BACKENDS: dict[str, BackendClass] = {
    "torch": TorchBackend,
}


def get_backend_class(name: str) -> BackendClass:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"PSN_BACKEND: unknown backend {name!r}; known: {sorted(BACKENDS)}") from None


__all__ = ["Backend", "BackendClass", "BACKENDS", "get_backend_class"]
