"""The type and meaningful values of a config key, checked the same way wherever the key is read: a config
file, a ``section.key=value`` override, a ``tune-postprocess --grid`` value or a section built in code.

Lives apart from ``config`` so that the modules whose keys these are (``postprocess``, ``loss_terms``)
state their own ranges and ``config`` collects them.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass

from vesuvius_lab.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """The meaningful values of a key: a numeric range (each item, for lists) or a set of choices."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    length: int | None = None  # lists: how many items
    ordered: bool = False  # lists: items in increasing order (a range written as [low, high])

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"

    def problem(self, key: str, value) -> str | None:
        """One line naming ``key`` when ``value`` is outside the rule, else None."""
        if value is None:
            return None
        items = value if isinstance(value, list | tuple) else [value]
        what = ("items " if isinstance(value, list | tuple) else "") + self.allowed()
        if self.length is not None and len(items) != self.length:
            return f"{key}: {value!r} must have {self.length} items, each {self.allowed()}"
        if self.ordered and any(a > b for a, b in zip(items, items[1:])):
            return f"{key}: {value!r} must be in increasing order ([low, high])"
        for item in items:
            if isinstance(item, str) and not self.choices:  # a key that takes a number or a name
                continue
            if self.choices:
                if item not in self.choices:  # a list's bad item named alone: the list may be long
                    return f"{key}: {item!r} is not one of {', '.join(map(str, self.choices))}"
                continue
            bad = isinstance(item, float) and not math.isfinite(item)
            if self.low is not None:
                bad |= item <= self.low if self.low_open else item < self.low
            if self.high is not None:
                bad |= item >= self.high if self.high_open else item > self.high
            if bad:
                return f"{key}: {value!r} is out of range (allowed: {what})"
        return None


def at_least(n: float) -> Rule:
    return Rule(low=n)


POSITIVE, NON_NEGATIVE, COUNT, SHARE = Rule(low=0, low_open=True), at_least(0), at_least(1), Rule(low=0, high=1)


def check_type(value, annotation, key: str):
    """Return ``value`` converted to ``annotation`` where lossless (int -> float), else raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value
