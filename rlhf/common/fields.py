"""Config fields and the rules every part's config dataclass checks with: a closed set of values (`one_of`), ranges.

Each rule raises ValueError with one line naming the key (`prefix.name=value`) and what it must be.
"""

from __future__ import annotations

from dataclasses import field, fields, is_dataclass
from typing import Any, get_type_hints


def one_of(default: str | None, *choices: str) -> Any:
    """A field that takes one of `choices`: `check_choices` refuses any other value, naming the key and these.

    The allowed values of every enum-like field are listed here, next to the field, and nowhere else.
    """
    return field(default=default, metadata={"choices": choices})


def choices(schema: type, name: str) -> tuple[str, ...]:
    """The allowed values of the `one_of` field `name` of a dataclass schema."""
    return next(f for f in fields(schema) if f.name == name).metadata["choices"]


def check_choices(node: Any, schema: type, prefix: str = "") -> None:
    """Every `one_of` field of `schema` (and of its nested schemas) in `node` holds one of its allowed values."""
    hints = get_type_hints(schema)
    for f in fields(schema):
        value = getattr(node, f.name)
        allowed = f.metadata.get("choices")
        if allowed is not None and value not in allowed:
            raise ValueError(f"{prefix}{f.name}={value!r} is not one of {', '.join(allowed)}")
        if is_dataclass(hints[f.name]) and value is not None:
            check_choices(value, hints[f.name], f"{prefix}{f.name}.")


def at_least(node: Any, prefix: str, minimum: float, *names: str) -> None:
    """Each of `names` is unset (None) or >= `minimum`."""
    for name in names:
        value = getattr(node, name)
        if value is not None and not value >= minimum:  # `not >=` also refuses NaN
            raise ValueError(f"{prefix}.{name}={value} must be >= {minimum}")


def positive(node: Any, prefix: str, *names: str) -> None:
    """Each of `names` is unset (None) or > 0."""
    for name in names:
        value = getattr(node, name)
        if value is not None and not value > 0:
            raise ValueError(f"{prefix}.{name}={value} must be > 0")


def fraction(node: Any, prefix: str, *names: str, closed: bool = True) -> None:
    """Each of `names` lies in [0, 1] (`closed`) or [0, 1)."""
    for name in names:
        value = getattr(node, name)
        if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
            raise ValueError(f"{prefix}.{name}={value} must be in [0, 1{']' if closed else ')'}")
