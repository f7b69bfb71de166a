"""Cache keys: the one place every front door builds them.

``/v1`` sources, ``@swr.cached`` views and ``@swr.memoize`` functions all name their
entries here, so two front doors can never disagree on what a key means. Keys are
logical strings; :mod:`service.keys` maps them to legal memcached keys (hashing anything
long or unusual) inside each namespace.

Canonical forms matter for correctness, not just hit rates: a query string is decoded
and re-encoded with every name and value escaped, then sorted, so ``?a=1%26b%3D2`` (one
parameter whose value contains ``&``) and ``?a=1&b=2`` (two parameters) are different
keys, and ``?b=2&a=1`` and ``?a=1&b=2`` are the same one.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from ..errors import CodecError
from ..memcache import codec


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    """``name=value`` pairs, each escaped, sorted, joined with ``&``."""
    return urlencode(sorted(pairs), doseq=False)


def view_key(prefix: str, path: str, query: Iterable[tuple[str, str]] | None,
             vary: Mapping[str, str] | None = None) -> str:
    """The key of a cached view: ``prefix`` (with ``%s`` replaced by the path, as
    Flask-Caching's ``key_prefix``), the canonical query, and the ``vary`` headers.

    :param query: the request's arguments, or ``None`` to key by the path alone
        (Flask-Caching's ``query_string=False``).
    """
    key = prefix % path if "%s" in prefix else prefix
    if query is not None:
        key += "?" + canonical_query(query)
    if vary:
        key += "#" + canonical_query((k.lower(), v) for k, v in vary.items())
    return key


def source_key(name: str, generation: int, params: Mapping[str, str]) -> str:
    """The key of a ``/v1`` source entry; ``generation`` is bumped to invalidate all."""
    return f"src:{name}:{generation}?{canonical_query(params.items())}"


def function_name(f: Callable[..., Any], source_check: bool = False) -> str:
    """A stable name for a function: module and qualified name, and with
    ``source_check`` a digest of its source, so changing the code changes the keys."""
    name = f"{f.__module__}.{f.__qualname__}"
    if source_check:
        try:
            source = inspect.getsource(f)
        except (OSError, TypeError):
            source = ""
        name += ":" + hashlib.sha256(source.encode()).hexdigest()[:16]
    return name


def call_key(name: str, generation: int, f: Callable[..., Any], args: Sequence[Any],
             kwargs: Mapping[str, Any], ignore: Iterable[str] = ()) -> str:
    """The key of one call of a memoized function: its name, its generation (bumped to
    forget every call, :mod:`service.generations`) and its arguments, normalised through
    the signature so ``f(1, b=2)`` and ``f(1, 2)`` share a key.

    Arguments are encoded with the safe codec; one it cannot encode (an object without a
    value form) contributes its ``repr``, as in Flask-Caching's ``memoize``.
    """
    try:
        bound = inspect.signature(f).bind(*args, **kwargs)
        bound.apply_defaults()
        items: list[Any] = [[k, v] for k, v in bound.arguments.items() if k not in set(ignore)]
    except (TypeError, ValueError):
        items = [list(args), sorted(kwargs.items())]
    try:
        blob = codec.encode(items)
    except CodecError:
        blob = repr(items).encode("utf-8", "surrogatepass")
    return f"fn:{name}:{generation}:{hashlib.sha256(blob).hexdigest()[:32]}"
