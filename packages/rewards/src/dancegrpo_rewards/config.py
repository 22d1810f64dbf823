"""The reward-service YAML config: dataclasses, loading, env-var expansion and checks.

Schema (every key documented in docs/serving.md)::

    server:
      host: 127.0.0.1            # bind address ("0.0.0.0" / "[::]" to serve other hosts)
      port: 50051                # 0 picks a free port
      metrics_port: 9464         # Prometheus HTTP port; 0 picks a free port; null disables
      max_message_bytes: 134217728   # 128 MiB; size it from your largest request (docs)
      max_connection_age_s: 300  # GOAWAY after this long (±10 %) so DNS clients re-resolve; null: never
      max_connection_age_grace_s: 120  # then calls in flight get this long; null: no limit
      grace_period_s: 30
      drain_s: 0                 # on SIGTERM: keep serving new calls this long after NOT_SERVING
      log_format: text           # or json (one JSON object per line)
      log_level: INFO
      decode_workers: 4          # threads decoding PNG/JPEG requests
      max_decoded_bytes: 2147483648  # most decoded pixel bytes per request (headers, pre-decode)
      tls: {cert: server.pem, key: server.key, client_ca: ca.pem}   # client_ca → mTLS
      auth: {token_env: DANCEGRPO_REWARDS_TOKEN}
    rewards:
      <name>:
        kind: jpeg_compressibility   # a registry kind or "package.module:Class"
        max_batch_size: 32
        max_queue_delay_ms: 5
        max_queue_size: 256
        max_samples_per_request: 256 # default: max_queue_size; at most max_queue_size
        max_height: 4096
        max_width: 4096
        max_frames: 1024
        min_size: 1
        options: {...}               # kind-specific, passed to Reward.__init__(name, options)

``${VAR}`` and ``${VAR:-default}`` expand in every string. Errors are ``RewardConfigError``
naming the dotted key (``rewards.hps.options.checkpoint``) or the missing file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dancegrpo_rewards.base import RewardConfigError

#: 128 MiB: 32 images of 1024x1024x3 uint8 (~101 MB) per request; videos need more
#: (docs/serving.md says how to size it).
DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024
DEFAULT_MAX_DECODED_BYTES = 2 * 1024 * 1024 * 1024
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Option keys treated as file paths that must exist (besides ``arch`` ending in ``.json``).
_PATH_KEY = re.compile(r"(^|_)(checkpoint|path|file|dir)$")


def _fail(key: str, message: str) -> RewardConfigError:
    return RewardConfigError(f"{key}: {message}")


def _check_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, f"must be an integer, got {value!r}")
    if value < minimum:
        raise _fail(key, f"must be >= {minimum}, got {value}")


def _check_number(key: str, value: Any, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(key, f"must be a number, got {value!r}")
    if value < minimum:
        raise _fail(key, f"must be >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """Server TLS: PEM certificate chain and key; ``client_ca`` set → clients need a cert (mTLS)."""

    cert: str
    key: str
    client_ca: str | None = None

    def __post_init__(self) -> None:
        for name in ("cert", "key", "client_ca"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _fail(f"server.tls.{name}", f"must be a non-empty path, got {value!r}")


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    """Bearer-token auth: the token is read from the environment variable ``token_env``."""

    token_env: str

    def __post_init__(self) -> None:
        if not isinstance(self.token_env, str) or not re.fullmatch(r"[A-Za-z_]\w*", self.token_env):
            raise _fail(
                "server.auth.token_env", f"must name an env variable, got {self.token_env!r}"
            )


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Process-wide settings (the ``server:`` section)."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9464
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_connection_age_s: float | None = 300.0
    max_connection_age_grace_s: float | None = 120.0
    grace_period_s: float = 30.0
    drain_s: float = 0.0
    log_format: str = "text"
    log_level: str = "INFO"
    decode_workers: int = 4
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    tls: TLSConfig | None = None
    auth: AuthConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise _fail("server.host", f"must be a non-empty string, got {self.host!r}")
        _check_int("server.port", self.port, 0)
        if self.port > 65535:
            raise _fail("server.port", f"must be <= 65535, got {self.port}")
        if self.metrics_port is not None:
            _check_int("server.metrics_port", self.metrics_port, 0)
            if self.metrics_port > 65535:
                raise _fail("server.metrics_port", f"must be <= 65535, got {self.metrics_port}")
        _check_int("server.max_message_bytes", self.max_message_bytes, 1024)
        if self.max_message_bytes > 2**31 - 1:
            raise _fail("server.max_message_bytes", "gRPC limits messages to 2 GiB - 1")
        if self.max_connection_age_s is not None:
            _check_number("server.max_connection_age_s", self.max_connection_age_s, 0.001)
        if self.max_connection_age_grace_s is not None:
            _check_number("server.max_connection_age_grace_s", self.max_connection_age_grace_s, 0)
        _check_number("server.grace_period_s", self.grace_period_s, 0)
        _check_number("server.drain_s", self.drain_s, 0)
        if self.log_format not in ("text", "json"):
            raise _fail("server.log_format", f"must be 'text' or 'json', got {self.log_format!r}")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise _fail(
                "server.log_level",
                f"must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}",
            )
        _check_int("server.decode_workers", self.decode_workers, 1)
        _check_int("server.max_decoded_bytes", self.max_decoded_bytes, 1)


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One hosted reward (an entry of ``rewards:``); 0 in ``max_height``/``max_width``/
    ``max_frames`` means no limit. ``max_samples_per_request`` defaults to ``max_queue_size``
    and may not exceed it (so every accepted request fits in the queue)."""

    name: str
    kind: str
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    dispatch_when_idle: bool = False
    max_queue_size: int = 256
    max_samples_per_request: int | None = None  # None → max_queue_size
    max_height: int = 4096
    max_width: int = 4096
    max_frames: int = 1024
    min_size: int = 1
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        prefix = f"rewards.{self.name}"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise _fail(prefix, "reward names use letters, digits, '_', '.', '-'")
        if not isinstance(self.kind, str) or not self.kind:
            raise _fail(f"{prefix}.kind", f"must be a non-empty string, got {self.kind!r}")
        _check_int(f"{prefix}.max_batch_size", self.max_batch_size, 1)
        _check_number(f"{prefix}.max_queue_delay_ms", self.max_queue_delay_ms, 0)
        if not isinstance(self.dispatch_when_idle, bool):
            raise _fail(
                f"{prefix}.dispatch_when_idle",
                f"must be true or false, got {self.dispatch_when_idle!r}",
            )
        _check_int(f"{prefix}.max_queue_size", self.max_queue_size, 1)
        if self.max_samples_per_request is None:
            object.__setattr__(self, "max_samples_per_request", self.max_queue_size)
        _check_int(f"{prefix}.max_samples_per_request", self.max_samples_per_request, 1)
        if self.max_samples_per_request > self.max_queue_size:
            raise _fail(
                f"{prefix}.max_samples_per_request",
                f"{self.max_samples_per_request} exceeds {prefix}.max_queue_size="
                f"{self.max_queue_size}; a request must fit in the queue (raise "
                "max_queue_size or lower max_samples_per_request)",
            )
        for key in ("max_height", "max_width", "max_frames"):
            _check_int(f"{prefix}.{key}", getattr(self, key), 0)
        _check_int(f"{prefix}.min_size", self.min_size, 1)
        if not isinstance(self.options, Mapping):
            raise _fail(f"{prefix}.options", f"must be a mapping, got {self.options!r}")


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """A whole service config: server settings and the hosted rewards, by name."""

    server: ServerConfig
    rewards: Mapping[str, RewardSpec]

    def __post_init__(self) -> None:
        if not self.rewards:
            raise _fail("rewards", "host at least one reward")


_SERVER_KEYS = {f.name for f in dataclasses.fields(ServerConfig)}
_REWARD_KEYS = {f.name for f in dataclasses.fields(RewardSpec)} - {"name"}


def expand_env(value: Any, key: str, env: Mapping[str, str]) -> Any:
    """Expands ``${VAR}`` / ``${VAR:-default}`` in every string of a nested structure."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise _fail(key, f"environment variable {name} is not set (used in {value!r})")

        return _ENV.sub(substitute, value)
    if isinstance(value, Mapping):
        return {k: expand_env(v, f"{key}.{k}" if key else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{key}[{i}]", env) for i, v in enumerate(value)]
    return value


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(key, f"must be a mapping, got {type(value).__name__}")
    return value


def _reject_unknown(section: Mapping[str, Any], known: set[str], key: str, hint: str = "") -> None:
    unknown = sorted(str(k) for k in set(section) - known)
    if unknown:
        raise _fail(
            f"{key}.{unknown[0]}",
            f"unknown key (known: {', '.join(sorted(known))}){hint}",
        )


def _parse_server(raw: Mapping[str, Any]) -> ServerConfig:
    _reject_unknown(raw, _SERVER_KEYS, "server")
    values = dict(raw)
    if "tls" in values and values["tls"] is not None:
        tls = _mapping(values["tls"], "server.tls")
        _reject_unknown(tls, {"cert", "key", "client_ca"}, "server.tls")
        for required in ("cert", "key"):
            if required not in tls:
                raise _fail(f"server.tls.{required}", "required when tls is set")
        values["tls"] = TLSConfig(**tls)
    if "auth" in values and values["auth"] is not None:
        auth = _mapping(values["auth"], "server.auth")
        _reject_unknown(auth, {"token_env"}, "server.auth")
        if "token_env" not in auth:
            raise _fail("server.auth.token_env", "required when auth is set")
        values["auth"] = AuthConfig(**auth)
    return ServerConfig(**values)


def _parse_reward(name: Any, raw: Any) -> RewardSpec:
    if not isinstance(name, str):
        raise _fail(f"rewards.{name}", "reward names must be strings")
    section = _mapping(raw, f"rewards.{name}")
    _reject_unknown(
        section, _REWARD_KEYS, f"rewards.{name}", "; put kind-specific keys under options"
    )
    if "kind" not in section:
        raise _fail(f"rewards.{name}.kind", "required")
    values = dict(section)
    values["options"] = dict(_mapping(values.get("options"), f"rewards.{name}.options"))
    return RewardSpec(name=name, **values)


def path_options(options: Mapping[str, Any], key: str) -> list[tuple[str, str]]:
    """``(dotted key, path)`` of every option that names a file: keys ``checkpoint``, ``*_path``,
    ``*_file``, ``*_dir``, ``*_checkpoint`` and ``arch`` ending in ``.json``, at any depth."""
    found: list[tuple[str, str]] = []
    for name, value in options.items():
        dotted = f"{key}.{name}"
        if isinstance(value, Mapping):
            found.extend(path_options(value, dotted))
        elif isinstance(value, str) and (
            _PATH_KEY.search(str(name)) or (name == "arch" and value.endswith(".json"))
        ):
            found.append((dotted, value))
    return found


def check_files(config: ServiceConfig) -> None:
    """Raises ``RewardConfigError`` naming the key and path of the first missing file."""
    paths: list[tuple[str, str]] = []
    if config.server.tls is not None:
        tls = config.server.tls
        paths += [("server.tls.cert", tls.cert), ("server.tls.key", tls.key)]
        if tls.client_ca:
            paths.append(("server.tls.client_ca", tls.client_ca))
    for spec in config.rewards.values():
        paths += path_options(spec.options, f"rewards.{spec.name}.options")
    for key, path in paths:
        if not Path(path).exists():
            raise _fail(key, f"file not found: {path}")


def parse_config(
    raw: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    require_files: bool = True,
) -> ServiceConfig:
    """Validates a parsed YAML mapping. ``require_files=False`` skips the files-exist check."""
    raw = _mapping(raw, "<config>")
    _reject_unknown(raw, {"server", "rewards"}, "<config>")
    raw = expand_env(raw, "", os.environ if env is None else env)
    server = _parse_server(_mapping(raw.get("server"), "server"))
    rewards_raw = _mapping(raw.get("rewards"), "rewards")
    rewards = {name: _parse_reward(name, section) for name, section in rewards_raw.items()}
    config = ServiceConfig(server=server, rewards=rewards)
    if require_files:
        check_files(config)
    return config


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    require_files: bool = True,
) -> ServiceConfig:
    """Loads a config from a YAML file path or an already-parsed mapping."""
    if isinstance(source, Mapping):
        return parse_config(source, env=env, require_files=require_files)
    path = Path(source)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RewardConfigError(f"config file {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RewardConfigError(f"config file {path}: invalid YAML ({exc})") from None
    return parse_config(raw or {}, env=env, require_files=require_files)
