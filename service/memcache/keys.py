"""Map any cache key to a key memcached accepts.

memcached keys are at most 250 bytes of printable ASCII without spaces or control
characters. A key that already fits (after the namespace prefix) is kept readable, which
helps operators reading ``stats cachedump`` or the admin page; any other key is replaced
by its SHA-256 digest. The two forms live under different markers (``k:`` and ``h:``), so
a readable key can never collide with a hashed one. Keys are never truncated or refused.
"""

from __future__ import annotations

from ..observe.logs import digest as digest

MAX_KEY_LENGTH = 250


def _is_plain(key: str) -> bool:
    # str.isprintable() is False for controls; isascii() rules out multi-byte UTF-8;
    # a space is printable but splits memcached's text protocol.
    return key.isascii() and key.isprintable() and " " not in key



def memcached_key(prefix: str, key: str | bytes) -> bytes:
    """The memcached key for ``key`` in the namespace ``prefix``.

    :param prefix: the ``[cache] key_prefix``, already validated as plain ASCII.
    :param key: any text or bytes, of any length.
    :return: a legal memcached key of at most 250 bytes.
    """
    if isinstance(key, str) and _is_plain(key):
        plain = f"{prefix}:k:{key}"
        if len(plain) <= MAX_KEY_LENGTH:
            return plain.encode("ascii")
    return f"{prefix}:h:{digest(key)}".encode("ascii")
