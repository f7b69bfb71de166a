r"""The registry of user classes whose values :mod:`service.codec` carries by name.

A dataclass, a NamedTuple or an Enum member is written to memcached as its class's
``module:qualname`` and its data (tags ``\0c``, ``\0N`` and ``\0e`` in the codec's table).
Why a registry: decoding never imports a module or looks a name up from those bytes, since
that would let whoever can write to memcached choose which code runs in our workers. A name
resolves only through the registry of classes this process has vouched for, and an unknown
name is a :class:`~service.errors.CodecError`, which callers treat as a miss.

How a class gets there: the first time one of its values is encoded in this process, or
explicitly with :func:`register` (re-exported as ``service.codec.register``) in a process
that only reads, such as a worker serving what another computed. Call it at import time,
next to the class, or use it as a class decorator.

Rebuilding a value runs no user code either: no ``__init__``, ``__post_init__``, ``__new__``
or ``_make``. So only classes that can be rebuilt that way are accepted (see
:func:`tag_of_class`).

:mod:`service.codec` imports this module, never the other way round: it passes in its own
``tag`` and ``untag`` for the values inside a dataclass or NamedTuple.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import CodecError

_C = TypeVar("_C", bound=type)
_T = TypeVar("_T")

# "module:qualname" -> (class, its tag). Filled from classes only, never from bytes read.
_classes: dict[str, tuple[type, str]] = {}


def register(cls: _C) -> _C:
    """Let this process decode values of a dataclass, NamedTuple or Enum class.

    Encoding registers a class by itself; a process that only reads (a worker serving
    what another computed) calls this at import time, next to the class, or uses it as a
    class decorator.

    :raises CodecError: not such a class, or another class is registered under its name.
    """
    _register(cls)
    return cls


def name_of(cls: type) -> str:
    """The dotted name of ``cls``, for error messages (the wire uses ``module:qualname``)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def tag_of_class(cls: Any) -> str | None:
    """The tag for values of ``cls``, or None when it is not carried by class."""
    if not isinstance(cls, type):
        return None
    if issubclass(cls, enum.Enum):
        return "\x00e"
    if dataclasses.is_dataclass(cls):
        # Rebuilt with object.__new__, which a builtin base or a custom __new__ rules out.
        return "\x00c" if cls.__new__ is object.__new__ else None
    fields = getattr(cls, "_fields", None)
    if issubclass(cls, tuple) and type(fields) is tuple and set(map(type, fields)) <= {str}:
        return "\x00N"
    return None


def _register(cls: type) -> str:
    name = f"{cls.__module__}:{cls.__qualname__}"
    known = _classes.get(name)
    if known is not None and known[0] is cls:
        return name
    if known is not None:
        raise CodecError(f"{name} is already registered for another class of that name")
    tag = tag_of_class(cls)
    if tag is None:
        raise CodecError(f"cannot register {cls!r}: only dataclasses (with object's "
                         "__new__), NamedTuples and Enums are carried by class")
    _classes[name] = (cls, tag)
    return name


def _lookup(name: Any, tag: str) -> Any:
    """The registered class ``name`` names. Never imports, never resolves anything else."""
    known = _classes.get(_want(str, name))
    if known is None:
        short = name[:200].rpartition(":")[2] or "TheClass"
        raise CodecError(f"cannot decode a value of class {name[:200]!r}: it is not "
                         f"registered in this process; call service.codec.register({short}) "
                         "where the class is defined")
    if known[1] != tag:
        raise ValueError(f"{name} is not the kind of class its tag says")
    return known[0]


def _want(kind: type[_T], v: Any) -> _T:
    # The codec's own shape check, repeated here so that this module need not import it.
    if type(v) is not kind:  # exact: True is not an int here
        raise TypeError(f"expected {kind.__name__}, got {type(v).__name__}")
    return v


# ---- encoding: called by the codec's tag() once it has recognised the kind ------------

def tag_enum(member: enum.Enum) -> Any:
    """``member`` tagged as ``\\0e``, registering its class.

    :raises CodecError: not a single member (a combination of flags, say).
    """
    cls = type(member)
    if cls.__members__.get(member.name) is not member:  # a combination of flags, say
        raise CodecError(f"cannot encode {member!r}: not a single member of {name_of(cls)}")
    return {"\x00e": [_register(cls), member.name]}


def tag_namedtuple(v: tuple[Any, ...], tag: Callable[[Any], Any]) -> Any:
    """``v``, whose class :func:`tag_of_class` tags ``\\0N``, tagged with its values.

    :raises CodecError: it carries attributes besides its fields, which would be lost.
    """
    cls = type(v)
    if getattr(v, "__dict__", None):
        raise CodecError(f"cannot encode {name_of(cls)}: it has attributes besides its fields")
    return {"\x00N": [_register(cls), [tag(x) for x in v]]}


def tag_dataclass(v: Any, tag: Callable[[Any], Any]) -> Any:
    """A dataclass instance tagged as ``\\0c``, every field (``init=False`` ones too).

    :raises CodecError: state outside its fields, or a field left unset.
    """
    cls = type(v)
    name = _register(cls)
    fields = dataclasses.fields(v)
    names = {f.name for f in fields}
    # State outside the fields would be lost, since decoding does not run __init__ (see
    # dataclass_from); a functools.cached_property is recomputed on use, so it may go.
    lost = [a for a in getattr(v, "__dict__", ())
            if a not in names and not isinstance(getattr(cls, a, None), functools.cached_property)]
    if lost:
        raise CodecError(f"cannot encode {name_of(cls)}: attributes {lost} are not fields")
    state = {}
    for f in fields:
        try:
            state[f.name] = tag(getattr(v, f.name))
        except AttributeError:
            raise CodecError(f"cannot encode {name_of(cls)}: field {f.name!r} is unset") from None
    return {"\x00c": [name, state]}


# ---- decoding: the payloads of those three tags ------------------------------------------
# A malformed payload raises ValueError, TypeError or LookupError, which the codec's
# decode() turns into a CodecError; an unregistered name raises CodecError directly.

def dataclass_from(inner: Any, untag: Callable[[Any], Any]) -> Any:
    """The dataclass instance a ``\\0c`` payload describes, rebuilt without ``__init__``."""
    name, state = _want(list, inner)
    cls = _lookup(name, "\x00c")
    fields = dataclasses.fields(cls)
    if type(state) is not dict or set(state) != {f.name for f in fields}:
        raise ValueError(f"stored fields do not match {name_of(cls)}'s (another release?)")
    # Rebuilt without __init__ or __post_init__: a cache read must not repeat what the
    # constructor does (I/O, counting, registering), and decoding runs no user code. So
    # every field is stored, init=False ones too: they hold what __post_init__ computed
    # when the value was made, and rerunning it is exactly what we avoid. object.__setattr__
    # fills frozen and slotted dataclasses alike. The price: the constructor's validation
    # is not re-run on what memcached hands back.
    obj = object.__new__(cls)
    for f in fields:
        object.__setattr__(obj, f.name, untag(state[f.name]))
    return obj


def namedtuple_from(inner: Any, untag: Callable[[Any], Any]) -> Any:
    """The NamedTuple a ``\\0N`` payload describes, rebuilt without its ``__new__``."""
    name, values = _want(list, inner)
    cls = _lookup(name, "\x00N")
    if len(_want(list, values)) != len(cls._fields):
        raise ValueError(f"stored fields do not match {name_of(cls)}'s (another release?)")
    return tuple.__new__(cls, [untag(x) for x in values])  # no user __new__ or _make


def enum_from(inner: Any) -> Any:
    """The Enum member a ``\\0e`` payload names, looked up by member name only."""
    name, member = _want(list, inner)
    return _lookup(name, "\x00e").__members__[_want(str, member)]
