"""What one front-end process keeps: the engine client, the served models' codecs, which WebSocket
connections watch which session, and a small cache of (owner, session) -> model (to parse a request's
steps before the engine core sees it; by owner, so another key's request about a session is sent to
the engine core, which answers 404, before its steps are parsed), and how many steps requests of each
(owner, session) it has sent and not had answered (``queue_full``). Made in the lifespan; routes reach
it through ``deps.py``."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from service.config import Settings
from service.errors import ModelNotFound, NotReady, SessionQueueFull
from service.frontend.client import EngineClient
from service.frontend.codec import ModelCodec
from service.metrics import FrontendMetrics

INTERNAL_INFO = ("wire_dtype", "model_dtype")  # model info fields for front ends only


def _consume(fut: Any) -> None:
    """A fire-and-forget call's answer: failures (the session is gone) need no one told here."""
    if not fut.cancelled():
        fut.exception()


def _release(counts: dict[tuple[str, str], int], key: tuple[str, str]) -> None:
    """One fewer of ``key`` in ``counts``; a count of zero is removed."""
    n = counts[key] - 1
    if n:
        counts[key] = n
    else:
        del counts[key]


class Frontend:
    def __init__(self, settings: Settings, client: EngineClient, metrics: FrontendMetrics, worker: int):
        self.settings, self.client, self.metrics, self.worker = settings, client, metrics, worker
        self.models: dict[str, dict[str, Any]] = {}  # name -> public model info
        self.codecs: dict[str, ModelCodec] = {}
        self.watchers: dict[str, set[Callable[[str, str], None]]] = {}  # session id -> callbacks(event, id)
        self.watched_owner: dict[str, str] = {}  # session id -> its owner, to watch it again after a restart
        self._session_models: OrderedDict[tuple[str, str], str] = OrderedDict()  # (owner, session id) -> model
        # (owner, session id) -> steps requests this front end has sent and not yet had answered
        self.outstanding: dict[tuple[str, str], int] = {}
        # (owner, session id) -> steps requests let through from their head (gate.py) that have not yet
        # reached limits.SessionGate (their ASGI task has not run): counted against the bound meanwhile
        self.admitting: dict[tuple[str, str], int] = {}
        client.on_hello = self._on_hello
        client.on_event = self._on_event

    def _on_hello(self, hello: dict[str, Any]) -> None:
        infos = hello["models"]
        self.codecs = {m["name"]: ModelCodec(m) for m in infos}
        self.models = {m["name"]: {k: v for k, v in m.items() if k not in INTERNAL_INFO} for m in infos}
        for name in self.models:  # every model's latency series exists from the start (at zero)
            self.metrics.latency(name)
        for sid in list(self.watchers):  # a restarted engine core (durable sessions) must know who watches what
            self.client.call("get", sid, True, self.watched_owner[sid]).add_done_callback(_consume)

    def _on_event(self, kind: str, sid: Any) -> None:
        for callback in list(self.watchers.get(sid, ())):
            callback(kind, sid)

    def check_ready(self) -> None:
        if not self.client.connected:
            raise NotReady("the engine core is not available (starting or restarting); retry shortly",
                           retry_after=1)

    def codec(self, name: Any) -> ModelCodec:
        self.check_ready()
        c = self.codecs.get(name) if isinstance(name, str) else None
        if c is None:
            raise ModelNotFound(f"model: no model named {name!r}; available: {sorted(self.codecs)}", field="model")
        return c

    def remember(self, info: dict[str, Any], owner: str) -> dict[str, Any]:
        """Note a session's model (from a session info answer to ``owner``) and return the info."""
        key = (owner, info["session_id"])
        self._session_models[key] = info["model"]
        self._session_models.move_to_end(key)
        while len(self._session_models) > 100_000:
            self._session_models.popitem(last=False)
        return info

    async def session_codec(self, sid: str, owner: str) -> ModelCodec:
        """The codec of session ``sid``'s model (asks the engine core once per unknown id: 404/410 there)."""
        model = self._session_models.get((owner, sid))
        if model is None:
            model = self.remember(await self.client.call("get", sid, False, owner), owner)["model"]
        return self.codec(model)

    def queue_full(self, sid: str, owner: str, ahead: int = 0) -> SessionQueueFull | None:
        """The refusal for one more steps request of ``owner``'s session ``sid`` if this front end alone has
        ``PSN_SESSION_QUEUE`` of them unanswered, else None.

        Each of those is in the engine core's queue of that session (or its answer is on the way back), where
        one more would be refused anyway: refusing here spares the round trip, and the HTTP route
        (``limits.SessionGate``) spares reading and parsing the body too. A flood of requests on one
        session then costs the service little more than the TCP and HTTP work (bench/overload.py)."""
        n = self.outstanding.get((owner, sid), 0) + ahead
        if n < self.settings.session_queue:
            return None
        return SessionQueueFull.waiting(sid, n)

    def admit(self, sid: str, owner: str) -> SessionQueueFull | None:
        """``queue_full`` for a request seen from its head only (gate.py), counting the requests let through
        that way whose ASGI task has not run yet; a request let through is counted until ``admitted``."""
        key = (owner, sid)
        err = self.queue_full(sid, owner, self.admitting.get(key, 0))
        if err is None:
            self.admitting[key] = self.admitting.get(key, 0) + 1
        return err

    def admitted(self, key: tuple[str, str]) -> None:
        """A request let through by ``admit`` has reached the app (or ended before it)."""
        _release(self.admitting, key)

    async def steps(self, sid: str, codec: ModelCodec, start: int | None, L: int, payload: bytes,
                    owner: str, sequence: tuple[bool, bool] | None = None) -> list[Any]:
        """Apply ``L`` steps to ``owner``'s session ``sid`` from ``start`` (None: append), timing the round trip;
        ``sequence``: an OIP sequence's (sequence_start, sequence_end), done with the steps as one engine
        operation (``EngineCore.sequence``).

        Returns the engine core's ``[start, replayed, steps_seen, spikes, scores]``.
        """
        self.check_ready()
        if (err := self.queue_full(sid, owner)) is not None:
            raise err
        key = (owner, sid)
        self.outstanding[key] = self.outstanding.get(key, 0) + 1
        t0 = time.perf_counter()
        try:
            if sequence is None:
                answer = await self.client.call("steps", sid, -1 if start is None else start, L, payload, owner)
            else:
                answer = await self.client.call("sequence", sid, codec.name, *sequence, L, payload, owner)
        finally:
            _release(self.outstanding, key)
        self.metrics.latency(codec.name).observe(time.perf_counter() - t0)
        return answer

    def watch(self, sid: str, owner: str, callback: Callable[[str, str], None]) -> None:
        """``callback`` hears of ``owner``'s session ``sid`` (the engine core was asked with ``get`` to tell)."""
        self.watchers.setdefault(sid, set()).add(callback)
        self.watched_owner[sid] = owner

    def unwatch(self, sid: str, callback: Callable[[str, str], None]) -> None:
        cbs = self.watchers.get(sid)
        if cbs is not None:
            cbs.discard(callback)
            if not cbs:
                del self.watchers[sid], self.watched_owner[sid]
