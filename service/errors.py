"""Service errors: each has an HTTP status, a stable code, a message naming the field, and maybe Retry-After."""

from __future__ import annotations


class ServiceError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, retry_after: float | None = None,
                 status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.field, self.retry_after = message, field, retry_after
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    def body(self) -> dict:
        err = {"code": self.code, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        return {"error": err}

    def body_for(self, path: str | bytes) -> dict:
        """The body for a request to ``path``: the Open Inference Protocol's ``{"error": message}`` under
        ``/v2`` (what tritonclient and KServe clients read), ``body()`` everywhere else."""
        oip = path.startswith(b"/v2") if isinstance(path, bytes) else path.startswith("/v2")
        return {"error": self.message} if oip else self.body()

    def retry_after_s(self) -> int | None:
        return None if self.retry_after is None else max(1, round(self.retry_after))

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after_s())}

    def ws_error(self) -> dict:
        """The ``error`` of a WebSocket ``error`` message: the body's, plus ``retry_after`` (seconds) when
        waiting helps (what an HTTP answer says in its Retry-After header)."""
        err = self.body()["error"]
        if self.retry_after is not None:
            err["retry_after"] = self.retry_after_s()
        return err


class InvalidInput(ServiceError):
    status, code = 422, "invalid_input"


class PastHorizon(ServiceError):
    status, code = 422, "past_horizon"


class TooManySteps(ServiceError):
    status, code = 413, "too_many_steps"


class RequestTooLarge(ServiceError):
    status, code = 413, "request_too_large"


class ModelNotFound(ServiceError):
    status, code = 404, "model_not_found"


class ModelCannotStream(ServiceError):
    status, code = 409, "model_cannot_stream"


class SessionNotFound(ServiceError):
    status, code = 404, "session_not_found"


class SessionGone(ServiceError):
    """An id that existed: ``code`` is ``session_expired`` (idle timeout) or ``session_closed`` (deleted)."""

    status, code = 410, "session_expired"


class SessionLost(ServiceError):
    """The session's state may be damaged (its backend call failed part-way): it was closed."""

    status, code = 410, "session_lost"


class SessionMoved(ServiceError):
    """Another replica took the session over (``PSN_CLUSTER``): reconnect (the router sends the request to
    the replica that holds it now) and re-send from the last acknowledged step with ``start``."""

    status, code = 409, "session_moved"


class StepGap(ServiceError):
    status, code = 409, "step_gap"


class RetryTooOld(ServiceError):
    status, code = 409, "retry_too_old"


class MethodNotAllowed(ServiceError):
    """A method the path does not take (``allow``: the ones it does, for the Allow header)."""

    status, code = 405, "method_not_allowed"

    def __init__(self, message: str, *, allow: str, **kwargs: object):
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Allow": self.allow}


class UpgradeRequired(ServiceError):
    """A plain HTTP request to the WebSocket endpoint (RFC 9110: a 426 names the protocol to switch to)."""

    status, code = 426, "upgrade_required"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Upgrade": "websocket"}


class SessionQueueFull(ServiceError):
    status, code = 429, "session_queue_full"

    @classmethod
    def waiting(cls, sid: str, n: int) -> SessionQueueFull:
        """The refusal of one more request for ``sid`` with ``n`` already waiting (the engine core's queue,
        or a front end's unanswered requests: the same answer either way)."""
        return cls(f"session {sid!r}: {n} requests are already waiting on it (PSN_SESSION_QUEUE); wait for "
                   "their answers before sending more", field="session_id", retry_after=1)


class RequestTimeout(ServiceError):
    status, code = 504, "request_timeout"


class ReadTimeout(ServiceError):
    """The client took longer than PSN_READ_TIMEOUT_S to send a whole request (head and body)."""

    status, code = 408, "read_timeout"


class TooManySessions(ServiceError):
    status, code = 503, "too_many_sessions"


class QueueFull(ServiceError):
    status, code = 503, "queue_full"


class StoreUnavailable(ServiceError):
    """The shared session store (cluster mode) did not answer while this replica had to take a session over."""
    status, code = 503, "session_store_unavailable"

    @classmethod
    def claiming(cls, sid: str, e: BaseException) -> StoreUnavailable:
        return cls(f"session {sid!r}: the shared session store (PSN_STATE_URL) did not answer ({type(e).__name__}), "
                   "so this replica cannot take the session over now; retry shortly", field="session_id",
                   retry_after=1)


class ShuttingDown(ServiceError):
    status, code = 503, "shutting_down"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class TooManyConnections(ServiceError):
    status, code = 503, "too_many_connections"


class Unauthorized(ServiceError):
    """No API key, or not one of PSN_API_KEYS (access control on)."""

    status, code = 401, "unauthorized"


class OriginNotAllowed(ServiceError):
    """A browser page from an origin outside PSN_ALLOWED_ORIGINS (and not this server's own)."""

    status, code = 403, "origin_not_allowed"


class HostNotAllowed(ServiceError):
    """A Host header naming a host this server does not answer for (PSN_ALLOWED_HOSTS; loopback names only
    when it listens on loopback): a page whose name was made to resolve here (DNS rebinding)."""

    status, code = 403, "host_not_allowed"


class HeadersTooLarge(ServiceError):
    status, code = 431, "headers_too_large"


class UrlTooLong(ServiceError):
    status, code = 414, "url_too_long"


class TooManyKeySessions(ServiceError):
    """The key already holds PSN_KEY_MAX_SESSIONS live sessions."""

    status, code = 429, "too_many_key_sessions"


class TooManyKeyConnections(ServiceError):
    """The key already holds PSN_KEY_MAX_CONNECTIONS WebSockets on this front-end process."""

    status, code = 429, "too_many_key_connections"


class RateLimited(ServiceError):
    """The key has used its PSN_KEY_STEPS_PER_S for now."""

    status, code = 429, "rate_limited"


def internal(e: BaseException) -> ServiceError:
    """A bug or a backend failure, answered 500 (never raised from bad input)."""
    return ServiceError(f"internal error: {type(e).__name__}", status=500, code="internal")
