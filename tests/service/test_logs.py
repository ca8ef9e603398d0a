"""``service.logs``: session ids are cut to their first 8 characters wherever a log line names a
``/v1/sessions/`` path, in the message and in uvicorn's access-log arguments, on every handler ``install``
reaches (the root logger's, which the engine core and our own loggers write to, and the named ones); keys a
client put in a URL's query are never written (the real server's log). And protocols.py's ``InvalidUtf8``,
the other filter on uvicorn's log."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from service.frontend.protocols import InvalidUtf8
from service.logs import MAX_LOGGED_CHARS, RedactSessionIds, cut, install, redact
from tests.service.conftest import DEFAULTS, Server

SID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(("text", "shown"), [
    (f"POST /v1/sessions/{SID}/steps", "POST /v1/sessions/01234567.../steps"),
    (f"/v1/sessions/{SID}?start=3 /v1/sessions/{SID}", "/v1/sessions/01234567...?start=3 /v1/sessions/01234567..."),
    ("/v1/sessions/abcdefgh/steps", "/v1/sessions/abcdefgh/steps"),  # 8 characters: nothing cut, no "..."
    ("/v1/sessions/abc?start=123456", "/v1/sessions/abc?start=123456"),  # a query is not part of the id
    (f"/v2/models/m/infer {SID}", f"/v2/models/m/infer {SID}"),  # only /v1/sessions/ paths
    (f'"WebSocket /v1/stream?session_id={SID}" 401', '"WebSocket /v1/stream?session_id=01234567..." 401'),
    (f"/v1/stream?a=1&session_id={SID}&b=2", "/v1/stream?a=1&session_id=01234567...&b=2"),
    ("/v1/stream?session_id=abcdefgh", "/v1/stream?session_id=abcdefgh"),
    # percent-encoded names: the service decodes them, so ?session%5Fid=ID attaches to ID
    (f"/v1/stream?session%5Fid={SID}&x=1", "/v1/stream?session%5Fid=01234567...&x=1"),
    (f"/v1/stream?session%5fid={SID[:8]}", f"/v1/stream?session%5fid={SID[:8]}"),
    (f"/v1/stream?Session%5Fid={SID}", f"/v1/stream?Session%5Fid={SID}"),  # another name (names are case-sensitive)
])
def test_redact_cuts_ids_in_session_paths_to_8_characters(text: str, shown: str) -> None:
    assert redact(text) == shown


@pytest.mark.parametrize(("text", "shown"), [
    ("/healthz?api_key=s3cret&x=1", "/healthz?api_key=***&x=1"),
    ("GET /m?X-Api-Key=a&Token=b&ACCESS_TOKEN=c&key=d&authorization=e&client_secret=f&sig=g HTTP/1.1",
     "GET /m?X-Api-Key=***&Token=***&ACCESS_TOKEN=***&key=***&authorization=***&client_secret=***&sig=*** HTTP/1.1"),
    ('"WebSocket /v1/stream?token=abc" 401', '"WebSocket /v1/stream?token=***" 401'),
    ("/m?protocols=psn.json.v1,psn.key.s3cret&x=1", "/m?protocols=psn.json.v1,psn.key.***&x=1"),
    ("/m?PSN.KEY.s3cret", "/m?PSN.KEY.***"),
    ("/m?tokens&design=1&session=2&keep=", "/m?tokens&design=1&session=2&keep="),  # no value; other names
    ("api_key=s3cret without a query", "api_key=s3cret without a query"),
    # percent-encoded or '+' in a name: decoded as the service decodes it
    ("/m?%74oken=a&%50WD=b&client+secret=c&%6bey=d&design%3D=e",
     "/m?%74oken=***&%50WD=***&client+secret=***&%6bey=***&design%3D=e"),
])
def test_redact_hides_the_values_of_credential_query_parameters_and_psn_key_entries(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_cut_keeps_the_first_characters_and_hides_a_key_the_cut_splits() -> None:
    short = f"/v1/sessions/{SID}?token=abc"
    assert cut(short) == "/v1/sessions/01234567...?token=***"  # short: only redacted
    head = "/m?" + "a" * (MAX_LOGGED_CHARS - 15) + "&api_key="
    assert cut(head + "K3Y" * 10) == head + "***" + f"...({len(head) + 30 - MAX_LOGGED_CHARS} more)"


def test_every_credential_name_and_the_length_docs_api_md_gives_is_what_the_log_filter_uses() -> None:
    """docs/api.md lists the parameter names whose values a logged query hides (contains one of these parts, or
    is one of these names) and how much of a request line is shown: each listed part hides a value anywhere in a
    name of any case, each listed name hides its own, and a line of exactly that length is not cut."""
    text = " ".join((Path(__file__).parents[2] / "docs" / "api.md").read_text().split())
    m = re.search(r"contains (.+?), or is (.+?) \(`\?api_key=`", text)
    assert m is not None, "docs/api.md no longer lists the credential names"
    parts, names = (re.findall(r"`([^`]+)`", group) for group in m.groups())
    assert len(parts) >= 8 and len(names) >= 3, (parts, names)
    for part in parts:
        for name in (part, f"x_{part.upper()}_y", f"{part}s"):
            assert redact(f"/m?a=1&{name}=s3cret&b=2") == f"/m?a=1&{name}=***&b=2", name
    for name in names:
        assert redact(f"/m?{name.upper()}=s3cret") == f"/m?{name.upper()}=***", name
    shown = re.search(r"shows the first (\d+) characters of its path and query", text)
    assert shown is not None and int(shown[1]) == MAX_LOGGED_CHARS
    line = "/m?q=" + "z" * (MAX_LOGGED_CHARS - 5)
    assert cut(line) == line and cut(line + "z") == line + "...(1 more)"


def test_the_filter_redacts_the_message_and_the_access_logs_string_arguments() -> None:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "POST", f"/v1/sessions/{SID}/steps", "1.1", 200), None)
    assert RedactSessionIds().filter(record)
    assert record.getMessage() == '127.0.0.1:5000 - "POST /v1/sessions/01234567.../steps HTTP/1.1" 200'
    record = logging.LogRecord("psn", logging.INFO, __file__, 1, f"closed /v1/sessions/{SID}", None, None)
    assert RedactSessionIds().filter(record) and record.getMessage() == "closed /v1/sessions/01234567..."
    why = "x" * (2 * MAX_LOGGED_CHARS)  # only a request line is cut: another line's argument is redacted, whole
    record = logging.LogRecord("psn", logging.WARNING, __file__, 1, "lost %s: %s", (f"/v1/sessions/{SID}", why), None)
    assert RedactSessionIds().filter(record) and record.getMessage() == f"lost /v1/sessions/01234567...: {why}"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def handlers() -> Iterator[tuple[Lines, Lines]]:
    root, named = Lines(), Lines()
    logging.getLogger().addHandler(root)
    logger = logging.getLogger("test-logs-named")
    logger.addHandler(named)
    logger.propagate = False
    yield root, named
    logging.getLogger().removeHandler(root)
    logger.removeHandler(named)


def test_install_filters_the_root_loggers_handlers_and_the_named_ones_once(handlers: tuple[Lines, Lines]) -> None:
    root, named = handlers
    install("test-logs-named")
    install("test-logs-named")
    assert [type(f) for f in root.filters] == [RedactSessionIds] == [type(f) for f in named.filters]
    logging.getLogger("psn.test-logs").warning(f"session /v1/sessions/{SID} gone")
    logging.getLogger("test-logs-named").warning("GET %s", f"/v1/sessions/{SID}")
    assert root.lines == ["session /v1/sessions/01234567... gone"] and named.lines == ["GET /v1/sessions/01234567..."]


@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING])
def test_a_text_frame_that_is_not_utf8_is_one_info_line_and_only_where_info_is_logged(level: int) -> None:
    logger = logging.getLogger("test-logs-utf8")
    lines = Lines()
    lines.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(lines)
    logger.addFilter(InvalidUtf8())
    logger.propagate = False
    logger.setLevel(level)
    try:
        try:
            b"\xff".decode()
        except UnicodeDecodeError:
            logger.exception(InvalidUtf8.MESSAGE)
        logger.error("something else")
    finally:
        logger.removeHandler(lines)
    assert lines.lines == ([f"INFO {InvalidUtf8.MESSAGE}"] if level == logging.INFO else []) + ["ERROR something else"]


@pytest.fixture(scope="module")
def plain(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real service, one front end, no access control (so requests reach the app and its access log)."""
    srv = Server({**DEFAULTS, "model_dir": model_dir}, tmp_path_factory.mktemp("logs")).start()
    yield srv
    srv.stop()


def logged_after(srv: Server, start: int, marker: str, count: int) -> str:
    """The server's log from ``start`` once ``marker`` is in it ``count`` times."""
    deadline = time.monotonic() + 10
    while srv.log()[start:].count(marker) < count:
        assert time.monotonic() < deadline, srv.log()[start:]
        time.sleep(0.05)
    return srv.log()[start:]


def handshake(url: str) -> None:
    """Open and close a WebSocket to ``url``, accepted or refused: its handshake's line is logged either way."""
    try:
        with connect(url):
            pass
    except InvalidStatus:
        pass


def test_keys_a_client_put_in_a_query_are_never_logged(plain: Server) -> None:
    """docs/api.md says never to put a key in a URL, but clients do (``?api_key=``, ``?token=``...): uvicorn's
    access log wrote the query whole, key and all, for an HTTP request and a WebSocket handshake alike."""
    keys = [f"query-key-{i}-0123456789abcdef" for i in range(8)]
    start = len(plain.log())
    assert httpx.get(f"{plain.url}/healthz?api_key={keys[0]}&Token={keys[1]}&x=1").status_code == 200
    assert httpx.get(f"{plain.url}/healthz?%74oken={keys[7]}").status_code == 200  # percent-encoded name
    assert httpx.get(f"{plain.url}/v1/sessions/{SID}?ACCESS_TOKEN={keys[2]}&key={keys[3]}&authorization={keys[4]}"
                     ).status_code == 404
    handshake(f"{plain.ws_url}?token={keys[5]}&protocols=psn.json.v1,psn.key.{keys[6]}")
    log = logged_after(plain, start, "psn.key.***", 1)
    assert not any(k in log for k in keys), log
    assert "/healthz?api_key=***&Token=***&x=1 HTTP/1.1" in log, log
    assert "/healthz?%74oken=*** HTTP/1.1" in log, log
    assert f"/v1/sessions/{SID[:8]}...?ACCESS_TOKEN=***&key=***&authorization=*** HTTP/1.1" in log, log
    assert "/v1/stream?token=***&protocols=psn.json.v1,psn.key.***" in log, log


def test_a_long_path_and_query_is_cut_in_the_log_and_still_redacted(plain: Server) -> None:
    """A request line of tens of KB (uvicorn reads up to PSN_MAX_HEADER_BYTES) was written to the log whole,
    once per request: a way to fill a disk. What is shown is cut, and a key or an id in it is still hidden."""
    key, pad = "long-query-key-0123456789abcdef", "x" * 20_000
    head = f"/v1/sessions/{SID}/steps?token={key}&pad="
    target = f"{head}{pad}&api_key={key}"
    start = len(plain.log())
    assert httpx.get(f"{plain.url}{target}").status_code in (404, 405)
    ws_pad = "y" * 6000  # websockets refuses a handshake's line past 8192 bytes (and logs none of it)
    ws_target = f"/v1/stream?session_id={SID}&pad={ws_pad}"
    handshake(f"{plain.ws_url.removesuffix('/v1/stream')}{ws_target}")
    log = logged_after(plain, start, " more)", 2)
    shown = f"/v1/sessions/{SID[:8]}.../steps?token=***&pad=" + "x" * (MAX_LOGGED_CHARS - len(head))
    assert f'"GET {shown}...({len(target) - MAX_LOGGED_CHARS} more) HTTP/1.1"' in log, log[-3000:]
    ws_shown = f"/v1/stream?session_id={SID[:8]}...&pad=" + "y" * (MAX_LOGGED_CHARS - len(ws_target) + len(ws_pad))
    assert f'"WebSocket {ws_shown}...({len(ws_target) - MAX_LOGGED_CHARS} more)"' in log, log[-3000:]
    assert key not in log and SID not in log and max(map(len, log.splitlines())) < 2 * MAX_LOGGED_CHARS, log[-3000:]
