"""Typed, frozen settings: the one place that reads and validates them.

The service reads ``settings.toml`` (:func:`load_settings`); a library user's app gets the
defaults, then its Flask config, then the ``SERVICE_SETTINGS`` file if set
(:func:`service.flaskconfig.library_settings`, which validates through
:func:`parse_settings` here). Anything wrong raises :class:`ConfigError` naming the file (or
``<Flask config>``), the key and what was expected, so start-up stops with a message an
operator can act on. Nothing else of the service is imported here, so the Flask-Caching
backend, a gunicorn config or a CLI can read settings without building the app.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_PATH = REPOSITORY / "settings.toml"
FLASK_CONFIG = "<Flask config>"
SOURCE_KINDS = ("http", "python", "composite")
EXECUTORS = ("thread", "process")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ConfigError(Exception):
    """The settings cannot be used; start-up stops. The message names the file (or
    ``<Flask config>``) and the key. Re-exported by :mod:`service.errors`."""


@dataclass(frozen=True)
class CacheSettings:
    servers: tuple[str, ...] = ("127.0.0.1:11211",)
    key_prefix: str = "svc"
    l1_max_entries: int = 10000
    l1_max_bytes: int = 64 * 1024 * 1024
    l1_ttl: float = 2.0
    connect_timeout: float = 0.25
    timeout: float = 0.25
    pool_size: int = 64
    pool_timeout: float = 1.0
    item_size_max: int = 1024 * 1024
    circuit_failures: int = 3
    circuit_reset: float = 0.5
    # Used when a caller gives none: Flask-Caching's timeout, the decorators' RFC 5861 windows.
    default_timeout: int = 300
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0

    def server_addresses(self) -> list[tuple[str, int]]:
        """``host:port`` strings as (host, port) pairs, validated at load time."""
        return [_split_server(s) for s in self.servers]


@dataclass(frozen=True)
class RefreshSettings:
    concurrency: int = 16
    lock_lease: float = 30.0
    fetch_timeout: float = 20.0
    error_ttl: float = 5.0
    backoff_max: float = 300.0
    xfetch_beta: float = 1.0


@dataclass(frozen=True)
class ServerSettings:
    monitor_threshold: float = 0.5
    log_format: str = "json"


@dataclass(frozen=True)
class SourceSettings:
    name: str
    kind: str
    max_age: float
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    url: str | None = None
    target: str | None = None
    executor: str = "thread"
    parts: tuple[str, ...] = ()
    max_body_bytes: int = 10 * 1024 * 1024  # http: a larger answer is a 502, not a stall


@dataclass(frozen=True)
class Settings:
    path: str = "<defaults>"
    cache: CacheSettings = field(default_factory=CacheSettings)
    refresh: RefreshSettings = field(default_factory=RefreshSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    sources: Mapping[str, SourceSettings] = field(default_factory=dict)


LAST_GOOD = "SERVICE_SETTINGS_LAST_GOOD"
"""Set by the gunicorn master (service.gunicorn.reload): the text of the last settings file
that was good, which a worker reads when the file was broken by a reload."""


def settings_path() -> str | os.PathLike[str] | None:
    """The settings file :func:`load_settings` reads by default: ``SERVICE_SETTINGS``, else
    the repository's ``settings.toml``, else none (installed in site-packages there is no
    repository, and a ``settings.toml`` there would be somebody else's)."""
    path: str | os.PathLike[str] | None = os.environ.get("SERVICE_SETTINGS") or None
    if path is None and (REPOSITORY / "pyproject.toml").is_file() and DEFAULT_PATH.is_file():
        path = DEFAULT_PATH
    return path


def load_settings(path: str | os.PathLike[str] | None = None, fallback: bool = True
                  ) -> Settings:
    """Read and validate the service's settings file.

    :param path: the TOML file; by default :func:`settings_path`, else the defaults.
    :param fallback: when the file is broken and the gunicorn master kept the text of the
        last good one in the environment (a reload with a broken file: see
        :mod:`service.gunicorn.reload`), read that instead; the master has logged which
        key of which file is wrong.
    :raises ConfigError: the file is missing, does not parse, or holds a bad value (and
        there is no last good text to fall back on).
    """
    path = path or settings_path()
    if path is None:
        return Settings()
    try:
        return parse_settings(_read_toml(Path(path)), str(path))
    except ConfigError:
        last_good = os.environ.get(LAST_GOOD)
        if not fallback or not last_good:
            raise
        return parse_settings(_parse_toml(last_good, Path(path)), str(path))


def checked_text(path: str | os.PathLike[str]) -> str:
    """The settings file's text, read once and validated (the gunicorn master keeps it as
    the last good one). :raises ConfigError: as :func:`load_settings`."""
    text = _read_text(Path(path))
    parse_settings(_parse_toml(text, Path(path)), str(path))
    return text


def _read_toml(path: Path) -> dict[str, Any]:
    return _parse_toml(_read_text(path), path)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read settings file: {exc.strerror or exc}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _parse_toml(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def parse_settings(data: Mapping[str, Any], path: str = "<memory>") -> Settings:
    """Validate an already parsed TOML document (used by tests and by :func:`load_settings`)."""
    r = _Reader(path)
    r.only(data, "", {"cache", "refresh", "server", "sources"})
    cache = _parse_cache(r, r.table(data, "cache"))
    refresh = _parse_refresh(r, r.table(data, "refresh"))
    server = _parse_server(r, r.table(data, "server"))
    sources_table = r.table(data, "sources")
    sources: dict[str, SourceSettings] = {}
    for name, table in sources_table.items():
        if not _NAME_RE.match(name):
            r.fail(f"sources.{name}", "a name of letters, digits, '-' or '_' (at most 64)")
        if not isinstance(table, Mapping):
            r.fail(f"sources.{name}", "a table")
        sources[name] = _parse_source(r, name, table)
    for src in sources.values():
        for part in src.parts:
            if part not in sources:
                r.fail(f"sources.{src.name}.parts", f"configured sources ({part!r} is not)")
            if sources[part].kind == "composite":
                r.fail(f"sources.{src.name}.parts",
                       f"non-composite sources ({part!r} is composite)")
    return Settings(path=path, cache=cache, refresh=refresh, server=server, sources=sources)


def _split_server(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(spec)
    return host.strip("[]"), int(port)


def _parse_cache(r: _Reader, t: Mapping[str, Any]) -> CacheSettings:
    d = CacheSettings()
    r.only(t, "cache", set(CacheSettings.__dataclass_fields__))
    servers = r.get(t, "cache.servers", list, list(d.servers))
    if not servers:
        r.fail("cache.servers", "at least one memcached server as 'host:port'")
    for s in servers:
        try:
            _split_server(s)
        except (ValueError, AttributeError):
            r.fail("cache.servers", "a list of 'host:port' strings (port 1-65535)", s)
    if len(set(servers)) != len(servers):
        r.fail("cache.servers", "each server listed once")
    prefix = r.get(t, "cache.key_prefix", str, d.key_prefix)
    if not _PREFIX_RE.match(prefix):
        r.fail("cache.key_prefix", "1-32 characters of letters, digits, '.', '-' or '_'")
    numbers: dict[str, Any] = {}
    for name, minimum in (("l1_max_entries", 0), ("l1_max_bytes", 0), ("pool_size", 1),
                          ("item_size_max", 1024), ("circuit_failures", 1),
                          ("default_timeout", 0)):
        numbers[name] = r.integer(t, f"cache.{name}", getattr(d, name), minimum=minimum)
    for name, positive in (("l1_ttl", False), ("connect_timeout", True), ("timeout", True),
                           ("pool_timeout", True), ("circuit_reset", True),
                           ("stale_while_revalidate", False), ("stale_if_error", False)):
        numbers[name] = r.duration(t, f"cache.{name}", getattr(d, name), positive=positive)
    return CacheSettings(servers=tuple(servers), key_prefix=prefix, **numbers)


def _parse_refresh(r: _Reader, t: Mapping[str, Any]) -> RefreshSettings:
    d = RefreshSettings()
    r.only(t, "refresh", set(RefreshSettings.__dataclass_fields__))
    durations = {name: r.duration(t, f"refresh.{name}", getattr(d, name), positive=positive)
                 for name, positive in (("lock_lease", True), ("fetch_timeout", True),
                                        ("error_ttl", False), ("backoff_max", True))}
    # XFetch's beta is a factor, not a duration: 0 turns early refreshes off, 1 is the
    # paper's default, larger refreshes earlier.
    beta = r.number(t, "refresh.xfetch_beta", d.xfetch_beta, "a factor >= 0 (1 is usual)")
    concurrency = r.integer(t, "refresh.concurrency", d.concurrency, minimum=1)
    return RefreshSettings(concurrency=concurrency, xfetch_beta=beta, **durations)


def _parse_server(r: _Reader, t: Mapping[str, Any]) -> ServerSettings:
    d = ServerSettings()
    r.only(t, "server", set(ServerSettings.__dataclass_fields__))
    fmt = r.get(t, "server.log_format", str, d.log_format)
    if fmt not in ("json", "text"):
        r.fail("server.log_format", "'json' or 'text'")
    threshold = r.duration(t, "server.monitor_threshold", d.monitor_threshold, positive=True)
    return ServerSettings(monitor_threshold=threshold, log_format=fmt)


_KIND_KEYS = {"http": {"url", "max_body_bytes"}, "python": {"target", "executor"},
              "composite": {"parts"}}
_COMMON_KEYS = {"kind", "max_age", "stale_while_revalidate", "stale_if_error"}


def _parse_source(r: _Reader, name: str, t: Mapping[str, Any]) -> SourceSettings:
    where = f"sources.{name}"
    kind = r.get(t, f"{where}.kind", str, None)
    if kind not in SOURCE_KINDS:
        r.fail(f"{where}.kind", f"one of {', '.join(map(repr, SOURCE_KINDS))}")
    allowed = _COMMON_KEYS | _KIND_KEYS[kind]
    for key in t:
        if key not in allowed:
            used_by = [k for k, keys in _KIND_KEYS.items() if key in keys]
            hint = f" (it belongs to kind {used_by[0]!r})" if used_by else ""
            r.fail(f"{where}.{key}", f"no such key for kind {kind!r}{hint}; allowed: "
                   + ", ".join(sorted(allowed)))
    if "max_age" not in t:
        r.fail(f"{where}.max_age", "a duration in seconds (required)")
    url = target = None
    executor, parts = "thread", ()
    if kind == "http":
        url = r.get(t, f"{where}.url", str, None)
        if not url or not url.startswith(("http://", "https://")):
            r.fail(f"{where}.url", "an http:// or https:// URL template (required)")
    elif kind == "python":
        target = r.get(t, f"{where}.target", str, None)
        if not target or not _TARGET_RE.match(target):
            r.fail(f"{where}.target", "'package.module:function' (required)")
        executor = r.get(t, f"{where}.executor", str, "thread")
        if executor not in EXECUTORS:
            r.fail(f"{where}.executor", "'thread' or 'process'")
    else:
        raw_parts = r.get(t, f"{where}.parts", list, None)
        if not raw_parts or not all(isinstance(p, str) for p in raw_parts):
            r.fail(f"{where}.parts", "a non-empty list of source names")
        if name in raw_parts:
            r.fail(f"{where}.parts", "other sources (a composite cannot contain itself)")
        parts = tuple(raw_parts)
    return SourceSettings(
        name=name, kind=kind, url=url, target=target, executor=executor, parts=parts,
        max_age=r.duration(t, f"{where}.max_age", 0.0, positive=True),
        stale_while_revalidate=r.duration(t, f"{where}.stale_while_revalidate", 0.0),
        stale_if_error=r.duration(t, f"{where}.stale_if_error", 0.0),
        max_body_bytes=r.integer(t, f"{where}.max_body_bytes", 10 * 1024 * 1024, minimum=1),
    )


class _Reader:
    """Typed look-ups that raise :class:`ConfigError` naming the file and the key."""

    def __init__(self, path: str, rename: Callable[[str], str] = str) -> None:
        self.path = path
        self.rename = rename  # the key as the user wrote it (a Flask key for Flask config)

    def fail(self, key: str, expected: str, got: Any = None) -> Any:
        got_text = f", got {got!r}" if got is not None else ""
        raise ConfigError(f"{self.path}: [{self.rename(key)}] expected {expected}{got_text}")

    def only(self, t: Mapping[str, Any], where: str, allowed: set[str]) -> None:
        for key in t:
            if key not in allowed:
                name = f"{where}.{key}" if where else key
                self.fail(name, f"a known key; allowed here: {', '.join(sorted(allowed))}",
                          "unknown key")

    def table(self, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = data.get(key, {})
        return value if isinstance(value, Mapping) else self.fail(key, "a table", value)

    def get(self, t: Mapping[str, Any], key: str, typ: type, default: Any) -> Any:
        leaf = key.rsplit(".", 1)[-1]
        if leaf not in t:
            return default
        value = t[leaf]
        if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
            self.fail(key, f"a {typ.__name__}", value)
        return value

    def integer(self, t: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
        value: int = self.get(t, key, int, default)
        if value < minimum:
            self.fail(key, f"an integer >= {minimum}", value)
        return value

    def number(self, t: Mapping[str, Any], key: str, default: float, expected: str) -> float:
        """A finite number >= 0 that is not a duration (a factor)."""
        leaf = key.rsplit(".", 1)[-1]
        value = t.get(leaf, default)
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or value < 0):
            self.fail(key, expected, value)
        return float(value)

    def duration(self, t: Mapping[str, Any], key: str, default: float,
                 positive: bool = False) -> float:
        leaf = key.rsplit(".", 1)[-1]
        value = t.get(leaf, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, "a number of seconds", value)
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            self.fail(key, "a positive number of seconds" if positive
                      else "a number of seconds >= 0", value)
        return float(value)
