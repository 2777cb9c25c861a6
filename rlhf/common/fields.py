"""Config fields with a closed set of allowed values, for every part's own config dataclass."""

from __future__ import annotations

from dataclasses import field, fields
from typing import Any


def one_of(default: str | None, *choices: str) -> Any:
    """A field that takes one of `choices`: `rlhf.run.validation` refuses any other value, naming the key and these.

    The allowed values of every enum-like field are listed here, next to the field, and nowhere else.
    """
    return field(default=default, metadata={"choices": choices})


def choices(schema: type, name: str) -> tuple[str, ...]:
    """The allowed values of the `one_of` field `name` of a dataclass schema."""
    return next(f for f in fields(schema) if f.name == name).metadata["choices"]
