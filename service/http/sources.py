"""Origins configured as ``[sources.NAME]``: ``http``, ``python`` and ``composite``.

A source knows its parameters, checks a request's query against them (400 naming what is
missing or unknown), and fetches a value. It never blocks the gevent hub:

* ``http``: urllib3's pool over gevent-patched sockets, with connect and read timeouts
  bounded by ``fetch_timeout``. A status >= 500, a timeout or a refused connection is an
  origin error; anything else (status, content type, body) is cached and passed through.
* ``python``: ``executor = "thread"`` runs the function in the hub's thread pool (right for
  functions that wait on I/O); ``executor = "process"`` runs it in a niced child process
  (:mod:`service.http.procpool`), because a CPU-bound function in a thread holds the GIL.
* ``composite``: reads each part through its own cache entry, concurrently.
"""

from __future__ import annotations

import inspect
import math
import string
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import urllib3
from gevent import get_hub

from ..config import SourceSettings
from ..errors import BadRequest, ConfigError, OriginError, OriginTimeout, TaskError, TaskTimeout
from ..readpath.freshness import Windows
from .procpool import ProcessPool, resolve

MAX_PARAM_BYTES = 64 * 1024


@dataclass
class Source:
    """One configured origin."""

    settings: SourceSettings
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    accepts_any: bool = False
    parts: tuple[Source, ...] = field(default=(), repr=False)
    # A python source's parameters annotated int, float or bool: converted from the query's
    # text before the call, and a value that does not convert is the caller's 400.
    types: Mapping[str, type] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def kind(self) -> str:
        return self.settings.kind

    @property
    def windows(self) -> Windows:
        s = self.settings
        return Windows(s.max_age, s.stale_while_revalidate, s.stale_if_error)

    def check(self, args: Mapping[str, str]) -> dict[str, str]:
        """The parameters of a request, validated.

        :raises BadRequest: a required parameter is missing, or one is not known (both
            are named in the message).
        """
        missing = [p for p in self.required if p not in args]
        known = set(self.required) | set(self.optional)
        unknown = [] if self.accepts_any else sorted(p for p in args if p not in known)
        if missing or unknown:
            problems = []
            if missing:
                problems.append("missing parameter(s): " + ", ".join(missing))
            if unknown:
                problems.append("unknown parameter(s): " + ", ".join(unknown))
            raise BadRequest("; ".join(problems), missing=missing, unknown=unknown,
                             expected=sorted(known))
        if self.kind == "http":
            for name in path_placeholders(self.settings.url or ""):
                if args.get(name) in (".", ".."):
                    raise BadRequest(f"parameter {name!r} may not be '.' or '..' (it is "
                                     "part of the origin's path)", parameter=name)
        for key, value in args.items():
            if len(value.encode("utf-8", "surrogatepass")) > MAX_PARAM_BYTES:
                raise BadRequest(f"parameter {key!r} is longer than {MAX_PARAM_BYTES} bytes")
        self.convert(args)  # a value its function cannot take is refused here, named
        return dict(args)

    def convert(self, args: Mapping[str, str]) -> dict[str, Any]:
        """The parameters as the function's annotations say (``int``, ``float``, ``bool``;
        anything else stays text).

        :raises BadRequest: a value that is not of its parameter's type, named.
        """
        out: dict[str, Any] = dict(args)
        for name, kind in self.types.items():
            if name in args:
                try:
                    out[name] = _CONVERT[kind](args[name])
                except ValueError:
                    raise BadRequest(
                        f"parameter {name!r} must be {_NAMES[kind]}, got {args[name]!r}",
                        parameter=name) from None
        return out

    def describe(self) -> dict[str, Any]:
        s = self.settings
        info: dict[str, Any] = {
            "name": s.name, "kind": s.kind,
            "params": {"required": list(self.required), "optional": list(self.optional)},
            "max_age": s.max_age, "stale_while_revalidate": s.stale_while_revalidate,
            "stale_if_error": s.stale_if_error,
        }
        if s.kind == "python":
            info["executor"] = s.executor
        if s.kind == "composite":
            info["parts"] = list(s.parts)
        return info


class Fetchers:
    """The I/O side of sources: the HTTP pool and the process pool of one worker.

    Both are created lazily on first use, in the worker that uses them.
    """

    def __init__(self, fetch_timeout: float) -> None:
        self.fetch_timeout = fetch_timeout
        self._http: urllib3.PoolManager | None = None
        self.processes = ProcessPool()

    def http(self) -> urllib3.PoolManager:
        if self._http is None:
            self._http = urllib3.PoolManager(
                num_pools=32, maxsize=16, block=False, retries=False,
                timeout=urllib3.Timeout(connect=min(5.0, self.fetch_timeout),
                                        read=self.fetch_timeout),
            )
        return self._http

    def fetch_http(self, source: Source, params: Mapping[str, str]) -> dict[str, Any]:
        url = fill_url(source.settings.url or "", params)
        limit = source.settings.max_body_bytes
        # Details name the source and what went wrong, never the origin's address or the
        # request's parameters: they reach clients (502 bodies) and logs.
        try:
            response = self.http().request("GET", url, preload_content=False)
            body = None
            try:
                if response.status >= 500:
                    raise OriginError(f"{source.name}: the origin answered {response.status}",
                                      origin_status=response.status)
                body = _read_bounded(response, limit)
            finally:
                if body is None:
                    # Its body was not read to the end (an error status, an answer over the
                    # limit, an exception): the connection must not go back to the pool, or
                    # the next request on it would read the rest as its own answer.
                    response.close()
                response.release_conn()
        except urllib3.exceptions.NewConnectionError as exc:
            # Refused, unreachable or unresolvable. urllib3 makes this a subclass of its
            # connect *timeout* error, so it must be caught first: it is a 502, not a 504.
            raise OriginError(f"{source.name}: cannot connect to the origin") from exc
        except (urllib3.exceptions.TimeoutError, TimeoutError) as exc:
            raise OriginTimeout(f"{source.name}: the origin timed out "
                                f"({type(exc).__name__})") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise OriginError(f"{source.name}: {type(exc).__name__} from the origin") from exc
        if body is None:
            raise OriginError(f"{source.name}: the origin's answer is larger than "
                              f"max_body_bytes ({limit})")
        return {"status": response.status,
                "content_type": response.headers.get("Content-Type", "application/octet-stream"),
                "body": body}

    def fetch_python(self, source: Source, params: Mapping[str, str]) -> Any:
        target = source.settings.target or ""
        if source.settings.executor == "process":
            try:
                return self.processes.run(target, source.convert(params), self.fetch_timeout)
            except TaskTimeout as exc:
                raise OriginTimeout(f"{source.name}: {exc}") from exc
            except TaskError as exc:
                raise OriginError(f"{source.name}: {exc}") from exc
        func = resolve(target)
        # The hub's thread pool: the greenlet waits, the hub keeps serving.
        value = get_hub().threadpool.apply(func, kwds=source.convert(params))
        try:
            orjson.dumps(value)
        except TypeError as exc:
            raise OriginError(f"{source.name}: {target} returned a value that is not "
                              f"JSON-encodable ({type(value).__name__}): {exc}") from exc
        return value

    def close(self) -> None:
        self.processes.close()
        if self._http is not None:
            self._http.clear()


def _read_bounded(response: Any, limit: int) -> bytes | None:
    """The body, read in pieces; ``None`` as soon as it passes ``limit`` bytes (a huge
    answer is refused early instead of being held whole in the worker's memory)."""
    pieces: list[bytes] = []
    size = 0
    for piece in response.stream(64 * 1024):
        size += len(piece)
        if size > limit:
            return None
        pieces.append(piece)
    return b"".join(pieces)


def placeholders(template: str) -> tuple[str, ...]:
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in names:
            names.append(name)
    return tuple(names)


def fill_url(template: str, params: Mapping[str, str]) -> str:
    """Fill ``{placeholders}`` with URL-encoded values (``/``, ``?``, ``&`` included).

    :raises BadRequest: a placeholder in the URL's path would be ``.`` or ``..``: encoded
        or not, a server resolves those as path segments (``/items/../detail`` is
        ``/detail``), which would let a caller reach another origin path.
    """
    for name in path_placeholders(template):
        if params.get(name) in (".", ".."):
            raise BadRequest(f"parameter {name!r} may not be '.' or '..' (it is part of "
                             "the origin's path)", parameter=name)
    quoted = {k: urllib.parse.quote(v, safe="") for k, v in params.items()}
    return template.format_map(quoted)


def path_placeholders(template: str) -> tuple[str, ...]:
    """The placeholders in the path of a URL template (before any ``?``)."""
    return placeholders(template.split("?", 1)[0])


def build_sources(configured: Mapping[str, SourceSettings], path: str) -> dict[str, Source]:
    """Sources from settings; python targets are imported now, so a typo stops start-up.

    :raises ConfigError: a target that does not import, or a URL template that is broken.
    """
    sources: dict[str, Source] = {}
    for name, s in configured.items():
        if s.kind == "http":
            try:
                names = placeholders(s.url or "")
                fill_url(s.url or "", dict.fromkeys(names, "x"))
            except (ValueError, KeyError, IndexError) as exc:
                raise ConfigError(f"{path}: [sources.{name}.url] bad template: {exc}") from exc
            sources[name] = Source(s, required=names)
        elif s.kind == "python":
            try:
                func = resolve(s.target or "")
            except ImportError as exc:
                raise ConfigError(
                    f"{path}: [sources.{name}.target] cannot import {s.target!r}: {exc}"
                ) from exc
            sources[name] = _python_source(s, func)
    for name, s in configured.items():
        if s.kind == "composite":
            parts = tuple(sources[p] for p in s.parts)
            required = tuple(dict.fromkeys(r for p in parts for r in p.required))
            optional = tuple(dict.fromkeys(
                o for p in parts for o in p.optional if o not in required))
            types = {k: v for p in parts for k, v in p.types.items()}
            sources[name] = Source(s, required, optional,
                                   any(p.accepts_any for p in parts), parts, types)
    return {name: sources[name] for name in configured}


def _python_source(s: SourceSettings, func: Any) -> Source:
    required: list[str] = []
    optional: list[str] = []
    accepts_any = False
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate: all text
        hints = {}
    types: dict[str, type] = {}
    for p in inspect.signature(func).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            accepts_any = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            (optional if p.default is not p.empty else required).append(p.name)
            if hints.get(p.name) in _CONVERT:
                types[p.name] = hints[p.name]
    return Source(s, tuple(required), tuple(optional), accepts_any, types=types)


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _integer(text: str) -> int:
    if not text.strip().lstrip("+-").isdigit() or len(text) > 30:
        raise ValueError(text)  # no "1_000", no 4,000 digits: a number as people write it
    return int(text)


def _real(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


_CONVERT: dict[type, Callable[[str], Any]] = {int: _integer, float: _real, bool: _boolean}
_NAMES = {int: "a whole number", float: "a number", bool: "true or false"}
