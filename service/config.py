"""Service settings: environment variables with the ``PSN_`` prefix, validated once at start-up."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import stat
import sys
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:  # the front ends never import torch (only the engine core runs models)
    import torch


# An API key: long enough not to be guessed, and only characters that fit in an HTTP token, so a browser can
# send it as a WebSocket subprotocol (``psn.key.<key>``) and no key can hold a list separator.
KEY_CHARS = re.compile(r"[A-Za-z0-9._~+-]+")
KEY_MIN_CHARS, KEY_MAX_CHARS = 16, 256
MAX_THREADS = 1024  # torch / onnxruntime threads, far past any machine (torch crashed at 16,384 here)


def key_hash(key: str) -> bytes:
    """What the service keeps of an API key (keys are random strings, not passwords: one SHA-256 is enough)."""
    return hashlib.sha256(key.encode()).digest()


class SettingsError(Exception):
    """A PSN_* variable the service cannot start with; the message names each bad variable, one per line."""

    def exit(self, prog: str) -> SystemExit:
        """What ``prog`` exits with: each line of the message after its name (status 1)."""
        return SystemExit("\n".join(f"{prog}: {line}" for line in str(self).splitlines()))


class BadSetting(SettingsError, ValueError):
    """A PSN_* variable found bad when it is used (an unknown backend, a store URL of another scheme, ...)."""


class KeySettingsError(SettingsError):
    """A bad PSN_API_KEYS / PSN_API_KEYS_FILE. Not a ValueError on purpose: pydantic would wrap that in a
    ValidationError that prints the settings' input, keys included."""


def parse_keys(text: str, where: str, sep: str) -> list[str]:
    """The keys in ``text`` (split on ``sep``; blank entries and ``#`` comment lines skipped), each checked.
    Errors name the key by its position, never by its value (they end up in logs)."""
    keys = [k.strip() for k in text.split(sep)]
    keys = [k for k in keys if k and not k.startswith("#")]
    for i, k in enumerate(keys, 1):
        if not KEY_MIN_CHARS <= len(k) <= KEY_MAX_CHARS or not KEY_CHARS.fullmatch(k):
            raise KeySettingsError(f"{where}: key {i} must be {KEY_MIN_CHARS}-{KEY_MAX_CHARS} characters of A-Z a-z "
                                   "0-9 . _ ~ + - (e.g. the output of `openssl rand -hex 32`)")
    return keys


def default_workers() -> int:
    """Front-end processes: one per core left over by the engine core, at least two, at most 16.

    At least two: on the 2-core box two front ends gave 1.3x (binary frames) and 1.2-1.5x (JSON) the
    session-steps/s of one (BENCHMARKS.md, quiet-box runs): a front end waits on its socket often
    enough that a second one fills the gaps."""
    return max(2, min(16, (os.cpu_count() or 2) - 1))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PSN_", extra="ignore", protected_namespaces=())

    host: str = "127.0.0.1"  # `python -m service` binds here
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"  # any case
    model_dir: Path = Path("exported")  # every folder with a config.json under it is served
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available, else cpu
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    backend: str = "torch"  # a name in service.backends.BACKENDS
    # torch.set_num_threads (1: the event loop needs the other core of a small CPU box, and more threads on a
    # shared CPU measured 10x slower); None = torch's default
    torch_threads: int | None = Field(1, ge=1, le=MAX_THREADS)
    # the engine core keeps up to this many MB of freed memory for the next batch instead of handing it back
    # to the kernel and page-faulting it in again (service/memory.py); 0: glibc's defaults
    malloc_keep_mb: int = Field(256, ge=0)
    max_sessions: int = Field(1024, ge=1)  # preallocated state slots per model
    max_batch_size: int = Field(256, ge=1)  # sessions stepped in one forward pass
    # how long the oldest pending step may wait for a fuller batch; 0: a batch runs as soon as the engine core is
    # free, and what arrives while it runs is the next batch (faster and sooner on the 2-core CPU: BENCHMARKS.md)
    max_wait_ms: float = Field(0.0, ge=0)
    idle_timeout_s: float = Field(300.0, gt=0)  # sessions without a request for this long expire
    max_steps_per_request: int = Field(1024, ge=1)  # steps in one request (streaming or classify)
    max_request_bytes: int = Field(1_000_000, ge=1024)  # HTTP body / WebSocket message size
    queue_depth: int = Field(4096, ge=1)  # pending requests per model before 503 queue_full
    session_queue: int = Field(16, ge=1)  # requests waiting on one session before 429 session_queue_full
    request_timeout_s: float = Field(30.0, gt=0)  # a queued request not run by then is answered 504, not applied
    max_connections: int = Field(8192, ge=1)  # per front end: WebSockets + HTTP requests in flight (health aside)
    ws_send_timeout_s: float = Field(10.0, gt=0)  # a WebSocket client not reading for this long is disconnected
    retry_window: int = Field(16, ge=0)  # recent step outputs kept per session to answer retries
    remember_gone: int = Field(100_000, ge=0)  # expired/closed ids remembered (answered 410, not 404)
    drain_timeout_s: float = Field(10.0, ge=0)  # shutdown: how long pending work may take to finish
    warmup: bool = True  # run each model once at start-up
    workers: int = Field(default_factory=default_workers, ge=1, le=64)  # front-end processes (HTTP + WebSocket)
    frontend_wait_s: float = Field(10.0, ge=0)  # a starting front end waits this long for the engine core
    engine_address: str | None = None  # unix:PATH or tcp:HOST:PORT of the engine core; default: a private unix socket
    ws_compression: bool = False  # permessage-deflate on /v1/stream (costs CPU, helps only on slow links)
    # Durable sessions (service/core/journal.py): a session log under state_dir, or in Redis at state_url
    # (redis://HOST:PORT/DB); neither: sessions live in memory only and a restart loses them.
    state_dir: Path | None = None
    state_url: str | None = None
    state_fsync: bool = False  # fsync each append: survive a power loss too, not only a crash of the engine
    state_compact_bytes: int = Field(64 << 20, ge=1 << 16)  # rewrite the log as one snapshot past this size
    # Replicas sharing sessions (docs/cluster.md): with state_url, one log and one lease per session in Redis,
    # and a replica asked about a session it does not hold takes it over.
    cluster: bool = False
    replica_id: str = Field(default_factory=lambda: os.environ.get("HOSTNAME") or f"replica-{os.getpid()}")
    cluster_prefix: str = "psn"  # Redis key prefix
    cluster_session_records: int = Field(64, ge=2)  # a session's log is rewritten as one snapshot past this
    # PSN_BACKEND=onnx only: where models without current ONNX files are exported once (default
    # ~/.cache/psn-stream/onnx), and onnxruntime's intra-op threads (default: its own choice).
    onnx_cache_dir: Path | None = None
    onnx_threads: int | None = Field(None, ge=1, le=MAX_THREADS)
    # Access control (off unless keys are given; docs/api.md "Access control"). Only SHA-256 hashes of the
    # keys are kept: both settings are read once, hashed, and the raw value dropped.
    api_keys: SecretStr | None = None  # comma-separated API keys; setting it turns access control on
    api_keys_file: Path | None = None  # a file of API keys, one per line (# comments); also turns it on
    key_max_sessions: int = Field(0, ge=0)  # live sessions one key may hold (0: no limit but PSN_MAX_SESSIONS)
    key_steps_per_s: float = Field(0.0, ge=0)  # steps per second one key may send, token bucket (0: no limit)
    # WebSockets one key may hold open at once, per front-end process: the front ends do not share counts
    key_max_connections: int = Field(0, ge=0)  # (0: no limit but PSN_MAX_CONNECTIONS); does nothing without keys
    # Origins (scheme://host[:port]) whose pages may use the API: WebSocket handshakes and CORS. A page of the
    # server's own origin (Origin matching Host) and clients that send no Origin are always allowed; "*": any.
    allowed_origins: str = ""
    # Host names (no port) requests may name in their Host header; "*": any. Unset: any, unless the service
    # listens on a loopback address only (PSN_HOST 127.x, ::1, localhost): then loopback names only, so a web
    # page whose own name an attacker makes resolve to 127.0.0.1 (DNS rebinding) cannot use the local API.
    allowed_hosts: str = ""
    max_header_bytes: int = Field(32768, ge=1024)  # request line + headers; past it: 431, connection closed
    # a request's head and body must have come in full this long after its first byte (or after the connection
    # opened, for its first request); a client that sends slower is answered 408 read_timeout and disconnected
    read_timeout_s: float = Field(60.0, gt=0)
    _key_hashes: tuple[bytes, ...] = PrivateAttr(())
    _keys_file_mode: int = PrivateAttr(0)  # PSN_API_KEYS_FILE's permission bits, as read

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _hash_keys(self) -> Settings:
        keys: list[str] = []
        if self.api_keys is not None:
            keys += parse_keys(self.api_keys.get_secret_value(), "PSN_API_KEYS", ",")
        if self.api_keys_file is not None:
            try:
                with open(self.api_keys_file) as f:
                    text = f.read()
                    self._keys_file_mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            except OSError as e:
                raise KeySettingsError(f"PSN_API_KEYS_FILE: cannot read {self.api_keys_file}: {e.strerror}") from None
            file_keys = parse_keys(text, f"PSN_API_KEYS_FILE ({self.api_keys_file})", "\n")
            if not file_keys:  # starting without access control when it was asked for would be worse than not starting
                raise KeySettingsError(f"PSN_API_KEYS_FILE: no keys in {self.api_keys_file}")
            keys += file_keys
        self._key_hashes = tuple(sorted({key_hash(k) for k in keys}))
        self.api_keys = None  # the raw keys go no further (not to the engine core or the front ends)
        return self

    @property
    def keys_file_warning(self) -> str | None:
        """What to warn about PSN_API_KEYS_FILE: users other than its owner may read or change it (ssh refuses
        such a key file; the service goes on, since Docker and Kubernetes often mount secrets 0444, read-only)."""
        mode = self._keys_file_mode
        if not mode & 0o066:  # execute bits give nothing away
            return None
        can = " and ".join(w for bits, w in ((0o044, "read"), (0o022, "changed")) if mode & bits)
        return (f"PSN_API_KEYS_FILE: {self.api_keys_file} can be {can} by users other than its owner (mode "
                f"{mode:04o}); chmod 600 it")

    @property
    def key_hashes(self) -> tuple[bytes, ...]:
        """SHA-256 of each API key; empty when access control is off."""
        return self._key_hashes

    @property
    def hosts(self) -> tuple[str, ...] | None:
        """PSN_ALLOWED_HOSTS as lower-case names; None: any host."""
        listed = tuple(h.strip().lower().rstrip(".") for h in self.allowed_hosts.split(",") if h.strip())
        if "*" in listed or (not listed and not loopback_name(self.host)):
            return None
        return listed

    @property
    def origins(self) -> tuple[str, ...]:
        """PSN_ALLOWED_ORIGINS as lower-case origins without a trailing slash."""
        return tuple(o.strip().rstrip("/").lower() for o in self.allowed_origins.split(",") if o.strip())

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BadSetting("PSN_DEVICE=cuda: this torch sees no CUDA device (torch.cuda.is_available() is "
                             "false); set PSN_DEVICE=cpu or auto")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)


def settings_help() -> str:
    """Every PSN_* variable with its default, one a line (``--help``; docs/api.md says what each does)."""
    computed = {"workers": f"{default_workers()} here (one per core but the engine core's, 2 to 16)",
                "replica_id": "$HOSTNAME, else replica-<pid>", "onnx_cache_dir": "~/.cache/psn-stream/onnx",
                "engine_address": "unset (a private unix socket)"}
    rows = []
    for name, field in Settings.model_fields.items():
        default = computed.get(name, "unset" if field.default is None else
                               str(field.default).lower() if isinstance(field.default, bool) else str(field.default))
        rows.append(f"  PSN_{name.upper():<26} {default or '(empty)'}")
    return "\n".join(rows)


def loopback_name(name: str) -> bool:
    """Whether ``name`` (a host name or address, IPv6 with or without brackets) can only mean this machine:
    ``localhost`` and names under it (RFC 6761: browsers resolve them to loopback themselves), 127.0.0.0/8,
    ::1."""
    name = name.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_argv(argv: list[str], prog: str, what: str) -> None:
    """``prog`` takes no arguments, its settings being environment variables: ``--help`` prints them and
    exits 0; anything else is a usage error (exit 2) rather than silently ignored (``--port 9000`` would
    still listen on PSN_PORT)."""
    if not argv:
        return
    if argv in (["-h"], ["--help"]):
        try:
            print(f"usage: {prog}\n\n{what}\nSettings are environment variables (docs/api.md says what each does), "
                  f"e.g. PSN_PORT=9000 {prog}. Defaults:\n{settings_help()}", flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted, no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail too
        raise SystemExit(0)
    print(f"{prog}: takes no arguments, got {' '.join(argv)!r}; settings are PSN_* environment variables, "
          f"e.g. PSN_PORT=9000 {prog} ({prog} --help lists them)", file=sys.stderr)
    raise SystemExit(2)


def settings_error(e: ValidationError) -> SettingsError:
    """One line per bad variable, ``PSN_WORKERS: Input should be a valid integer (got 'abc')``, instead of
    pydantic's report with its links; the value of a secret (an API key) is never repeated."""
    lines = []
    for err in e.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else ""
        name = "PSN_" + field.upper() if field else "PSN_* settings"
        secret = field in Settings.model_fields and "SecretStr" in str(Settings.model_fields[field].annotation)
        got = f" (got {err['input']!r})" if isinstance(err.get("input"), str) and not secret else ""
        lines.append(f"{name}: {err['msg']}{got}")
    return SettingsError("\n".join(lines))


@lru_cache
def get_settings() -> Settings:
    """The settings from the environment; a SettingsError naming each bad PSN_* variable."""
    try:
        return Settings()
    except ValidationError as e:
        raise settings_error(e) from None
