"""How an option is declared, once, and what is derived from the declaration.

An options class is a frozen dataclass whose fields are made by :func:`option`: type, default, a
one-line doc (``field.metadata["doc"]``) and, optionally, a check (``field.metadata["check"]``).
From the fields come:

- validation (:func:`check_fields`): each field's check, raising ``TypeError`` / ``ValueError``
  that names the argument, the value and what is allowed;
- checkpoints (:func:`to_dict`, :func:`from_dict`);
- environment variables (``GAUSSK_`` + the upper-cased name, parsed by the field's type:
  :func:`parse_env`, :func:`env_values`, :func:`from_env`);
- documented keyword arguments (the front ends read ``metadata["doc"]``).

:class:`~lightning_gaussk.config.GaussKConfig` and
:class:`~lightning_gaussk.config.LocalSGDConfig` are both declared this way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

__all__ = [
    "ENV_PREFIX",
    "Check",
    "boolean",
    "check_fields",
    "env_values",
    "from_dict",
    "from_env",
    "in_range",
    "integer",
    "one_of",
    "option",
    "optional",
    "parse_env",
    "to_dict",
]

ENV_PREFIX = "GAUSSK_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"", "none", "null"}

#: a field's check: ``check(name, value)`` raises ``TypeError`` / ``ValueError`` naming ``name``
Check = Callable[[str, Any], None]
C = TypeVar("C")


def option(default: Any, doc: str, check: Check | None = None) -> Any:
    """A dataclass field with its ``default``, its one-line ``doc`` and its ``check``."""
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check})


# ---------------------------------------------------------------------------- checks
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(low: int | None = None) -> Check:
    """An ``int`` (``>= low`` when given; ``bool`` refused)."""
    shown = "an int" if low is None else f"an int >= {low}"

    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be {shown}, got {type(value).__name__} {value!r}")
        if low is not None and value < low:
            raise ValueError(f"`{name}` must be {shown}, got {value!r}")

    return check


def boolean() -> Check:
    """A ``bool`` (``0`` / ``1`` refused: a flag is spelled True or False)."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool (True or False), got {type(value).__name__} {value!r}")

    return check


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """A number in the interval from ``low`` to ``high`` (open ends as given; NaN refused)."""
    shown = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(name: str, value: Any) -> None:
        if not _is_number(value):
            raise TypeError(f"`{name}` must be a number in {shown}, got {type(value).__name__} {value!r}")
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):  # also NaN
            raise ValueError(f"`{name}` must be a number in {shown}, got {value!r}")

    return check


def one_of(choices: Sequence[Any] | Callable[[], Sequence[Any]]) -> Check:
    """One of ``choices`` (a callable: read when checked, e.g. a registry's names)."""

    def check(name: str, value: Any) -> None:
        allowed = list(choices() if callable(choices) else choices)
        if isinstance(value, bool) or value not in allowed:
            raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")

    return check


def optional(inner: Check) -> Check:
    """None, or a value that passes ``inner``."""

    def check(name: str, value: Any) -> None:
        if value is not None:
            try:
                inner(name, value)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{err}; None is also allowed") from None

    return check


def check_fields(obj: Any) -> None:
    """Run every field's check on ``obj`` (in declaration order), and turn numbers given as
    ``int`` for a ``float`` field into ``float``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        check = f.metadata.get("check")
        if check is not None:
            check(f.name, value)
        if _is_number(value) and float in _types(hints[f.name]) and not isinstance(value, float):
            object.__setattr__(obj, f.name, float(value))


def _types(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


# ---------------------------------------------------------------------------- derived forms
def to_dict(obj: Any) -> dict[str, Any]:
    """Plain Python values, one per field (what checkpoints store)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Inverse of :func:`to_dict`. Fields missing from ``data`` take their defaults; unknown keys
    raise ``ValueError`` naming them."""
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__}.from_dict: unknown option(s) {unknown}; known: {known}")
    return cls(**data)


def env_values(cls: type, environ: Mapping[str, str]) -> dict[str, Any]:
    """The options of ``cls`` set by ``GAUSSK_*`` variables in ``environ``, parsed by each field's
    type (unvalidated; ``ValueError`` naming the variable for text that does not parse)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        var = ENV_PREFIX + f.name.upper()
        if var in environ:
            out[f.name] = parse_env(var, environ[var], hints[f.name])
    return out


def from_env(cls: type[C], environ: Mapping[str, str], overrides: Mapping[str, Any]) -> C:
    """``cls`` from keywords > ``GAUSSK_*`` variables > defaults, validated; an invalid value that
    came from the environment is reported with its variable."""
    found = {k: v for k, v in env_values(cls, environ).items() if k not in overrides}
    try:
        return cls(**{**found, **overrides})
    except (TypeError, ValueError) as err:
        if not found:
            raise
        where = ", ".join(f"{ENV_PREFIX + k.upper()}={environ[ENV_PREFIX + k.upper()]!r}" for k in found)
        raise type(err)(f"{err} (settings from the environment: {where})") from err


def parse_env(var: str, raw: str, hint: Any) -> Any:
    """``raw`` as a value of type ``hint``: bool (1/0, true/false, yes/no, on/off), int, float,
    str, a ``Literal`` of str, or any of them ``| None`` (none, null or empty)."""
    text = raw.strip()
    args = typing.get_args(hint)
    optional = type(None) in args and (typing.get_origin(hint) in (typing.Union, types.UnionType))
    if optional:
        if text.lower() in _NONE:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) > 1:  # e.g. float | Literal["measure"]: a listed word, else the first type's parse
            words = [w for a in rest if typing.get_origin(a) is Literal for w in typing.get_args(a)]
            if text in words:
                return text
            try:
                return parse_env(var, raw, rest[0] | None)
            except ValueError:
                raise ValueError(
                    f"environment variable {var}={raw!r} is invalid: expected a {rest[0].__name__}, one of {words} or 'none'"
                ) from None
        (hint,) = rest
    if hint is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        expected = "one of 1/0, true/false, yes/no, on/off"
    elif hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            expected = f"an {hint.__name__}" if hint is int else "a float"
    elif typing.get_origin(hint) is Literal:
        return text  # validated by the options class, with the choices named
    else:
        return text
    if optional:
        expected += " or 'none'"
    raise ValueError(f"environment variable {var}={raw!r} is invalid: expected {expected}")

