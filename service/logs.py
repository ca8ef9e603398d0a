"""Log hygiene: a session id is never written in full to a log, only its first 8 characters; an API key
offered as a ``psn.key.<key>`` subprotocol entry is never written at all (``hide_keys``), nor one a client
put in a URL's query (``?api_key=...``: the service never reads keys from there, but clients do it anyway).

An id is what lets a client act on a session (with access control off, it is the only thing), and ids
show up in URL paths (``/v1/sessions/{id}/steps``) and queries (``/v1/stream?session_id=ID``) that
uvicorn's access log writes. ``install()`` puts a filter on every handler of the process's loggers
(uvicorn's access and error logs and ours) that shortens ids in both; the engine core's own messages
already print ``id[:8]``. The same filter cuts a request line's long path and query (``cut``).
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

SESSION_IN_PATH = re.compile(r"(/v1/sessions/[^/?#\s\"']{8})[^/?#\s\"']+")
# /v1/stream?session_id=ID (the URL a proxy routes a WebSocket by, docs/cluster.md): uvicorn logs the query too
SESSION_IN_QUERY = re.compile(r"([?&]session_id=[^&#\s\"']{8})[^&#\s\"']+")
KEY_IN_SUBPROTOCOL = re.compile(r"(psn\.key\.)[^\s,;\"']+", re.IGNORECASE)
# A query parameter, name and "=" (group 1); a name never spans "?" or "&", so each is read once: linear
QUERY_PARAM = re.compile(r"([?&]([^?&#=\s\"']*)=)[^&#\s\"']*")
KEY_IN_QUERY = re.compile(r"(psn\.key\.)[^&#\s,;\"']+", re.IGNORECASE)
# A parameter whose name (lower case) holds one of these, or is one of CREDENTIAL_NAMES, has its value hidden
CREDENTIAL_PARTS = ("key", "token", "secret", "passw", "auth", "credential", "signature", "jwt")
CREDENTIAL_NAMES = ("sig", "pwd", "pass")
# What a request line of the access log shows of each field (path and query, method): uvicorn accepts a
# request line up to PSN_MAX_HEADER_BYTES, and writing tens of KB per request whole is a way to fill a disk
MAX_LOGGED_CHARS = 512


def credential(name: str) -> bool:
    """Whether a query parameter called ``name`` looks like it carries a credential (case-insensitive):
    ``api_key``, ``X-Api-Key``, ``token``, ``access_token``, ``authorization``, ``client_secret``, ``sig``..."""
    name = name.lower()
    return name in CREDENTIAL_NAMES or any(part in name for part in CREDENTIAL_PARTS)


def hide_query_credential(m: re.Match[str]) -> str:
    # A name as the service reads it: percent-decoded (Starlette's query_params, Ray's router do), so
    # ?api%5Fkey= or ?%74oken= hide their values and ?session%5Fid=ID (an attach, as good as session_id) is cut
    name = unquote_plus(m[2]) if "%" in m[2] or "+" in m[2] else m[2]
    if credential(name):
        return m[1] + "***"
    if name != m[2] and name == "session_id" and len(m[0]) - len(m[1]) > 8:
        return m[0][:len(m[1]) + 8] + "..."
    return m[0]


def redact(text: str) -> str:
    """``text`` with each session id in a /v1/sessions/ path or a ``session_id=`` query parameter cut to its
    first 8 characters (then "..."), and the value of each query parameter named like a credential
    (``credential``) and, in a line with a query, the key of each ``psn.key.<key>`` entry written as ``***``."""
    if "/v1/sessions/" in text:
        text = SESSION_IN_PATH.sub(r"\1...", text)
    if "session_id=" in text:
        text = SESSION_IN_QUERY.sub(r"\1...", text)
    if "?" in text:  # a query: most lines have none
        if "=" in text:
            text = QUERY_PARAM.sub(hide_query_credential, text)
        if "psn.key." in text.lower():
            text = KEY_IN_QUERY.sub(r"\1***", text)
    return text


def hide_keys(text: str) -> str:
    """``text`` with the key of each ``psn.key.<key>`` subprotocol entry replaced by ``***`` (websockets quotes a
    Sec-WebSocket-Protocol header it cannot parse, key and all, in its error)."""
    return KEY_IN_SUBPROTOCOL.sub(r"\1***", text)


def cut(text: str) -> str:
    """``text`` redacted, cut to its first MAX_LOGGED_CHARS characters (then ``...(N more)``, N counted in
    ``text``). Cut first: what is left out is never searched, and a key or an id the cut splits is still
    hidden or shortened, its name having come before it."""
    if len(text) <= MAX_LOGGED_CHARS:
        return redact(text)
    return f"{redact(text[:MAX_LOGGED_CHARS])}...({len(text) - MAX_LOGGED_CHARS} more)"


class RedactSessionIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):  # uvicorn's access log: (client, method, path, version, status)
            # a request line: the access log's, or a WebSocket handshake's (uvicorn writes those to its error log)
            line = record.name == "uvicorn.access" or (isinstance(record.msg, str)
                                                       and record.msg.startswith('%s - "WebSocket '))
            shown = cut if line else redact
            record.args = tuple(shown(a) if isinstance(a, str) else a for a in record.args)
        return True


def install(*names: str) -> None:
    """Add the filter to every handler of the root logger and of the loggers ``names`` (after logging is set up)."""
    f = RedactSessionIds()
    for logger in (logging.getLogger(), *map(logging.getLogger, names)):
        for handler in logger.handlers:
            if not any(isinstance(x, RedactSessionIds) for x in handler.filters):
                handler.addFilter(f)
