"""Build response payloads from engine objects."""

from __future__ import annotations

import time

from fastapi import Response

from service.engine.engine import Engine
from service.engine.model_engine import ModelEngine
from service.engine.sessions import Session


def model_info(me: ModelEngine) -> dict:
    cfg = me.cfg
    return {"name": me.name, "neuron": cfg.neuron, "streams": me.streams,
            "k": cfg.k if cfg.neuron in ("masked", "sliding") else None,
            "horizon": cfg.T if cfg.neuron in ("masked", "psn") else None,
            "input_shape": list(cfg.input_shape), "output_shape": list(me.model.net.out_shape),
            "num_classes": cfg.num_classes, "class_names": me.labels,
            "dataset": me.model.config.get("dataset", ""), "metrics": me.model.metrics, "config": cfg.to_dict()}


def session_info(engine: Engine, s: Session) -> dict:
    me = engine.models[s.model]
    timeout = engine.settings.idle_timeout_s
    return {"session_id": s.id, "model": s.model, "input_shape": list(me.cfg.input_shape),
            "horizon": me.cfg.T if me.cfg.neuron == "masked" else None, "steps_seen": s.t,
            "idle_timeout_s": timeout, "expires_in_s": max(0.0, timeout - (time.monotonic() - s.last_used))}


class JSONText(Response):
    """A response whose body is JSON text built by ``service.encode`` (already serialised)."""

    media_type = "application/json"
