"""Name -> class registries with did-you-mean errors (lm-eval-harness style), and the one
place where config values are checked against the dataclass that receives them."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Callable, TypeVar

from .errors import SparsebenchError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> type:
        if not isinstance(name, str) or name not in self._items:
            raise SparsebenchError(
                f"unknown {self.kind} '{name}'{did_you_mean(str(name), self.names())}; "
                f"valid: {', '.join(self.names())}"
            )
        return self._items[name]

    def build(self, name: str, kwargs: dict[str, Any]) -> Any:
        return build_dataclass(self.get(name), kwargs, f"{self.kind} '{name}'")


# ----------------------------------------------------------------------------- options


def option(
    default: Any = dataclasses.MISSING,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    choices: tuple | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its valid range, checked by build_dataclass before any work.

    Numbers (and each entry of a tuple of numbers) must satisfy the bounds; strings must be
    one of `choices`. The type comes from the field's annotation.
    """
    check = {
        k: v for k, v in dict(gt=gt, ge=ge, lt=lt, le=le, choices=choices).items() if v is not None
    }
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"check": check}
    )


_BOUNDS = {
    "gt": (">", lambda v, b: v > b),
    "ge": (">=", lambda v, b: v >= b),
    "lt": ("<", lambda v, b: v < b),
    "le": ("<=", lambda v, b: v <= b),
}


def check_value(value: Any, tp: Any, what: str, **check) -> Any:
    """`value` as type `tp` (int, float, bool, str, X | None, tuple[...], ...), within
    `check`'s bounds; raises one SparsebenchError naming the value and what is allowed.

    An int field accepts an integral float (1e3) and nothing else (1.5, "3", true);
    a float field takes ints and floats, never a string ("0.5 " is an error, not 0.5).
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return check_value(value, inner[0] if len(inner) == 1 else Any, what, **check)
    if tp is bool or tp == "bool":
        if not isinstance(value, bool):
            raise SparsebenchError(f"{what} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SparsebenchError(f"{what} must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SparsebenchError(f"{what} must be a number, got {value!r}")
        value = float(value)
        if math.isnan(value):
            raise SparsebenchError(f"{what} must be a number, got nan")
    elif tp is str:
        if not isinstance(value, str):
            raise SparsebenchError(f"{what} must be a string, got {value!r}")
    elif origin is tuple and args:
        if not isinstance(value, (list, tuple)):
            raise SparsebenchError(f"{what} must be a list, got {value!r}")
        if args[-1] is Ellipsis:
            return tuple(
                check_value(v, args[0], f"{what} (entry {i})", **check) for i, v in enumerate(value)
            )
        if len(value) != len(args):
            raise SparsebenchError(
                f"{what} must be a list of {len(args)} values, got {list(value)!r}"
            )
        return tuple(
            check_value(v, a, f"{what} (entry {i})", **check)
            for i, (v, a) in enumerate(zip(value, args))
        )
    else:
        return value  # Any, dict, nested specs: their own dataclass checks them
    if "choices" in check and value not in check["choices"]:
        raise SparsebenchError(
            f"{what} is {value!r}; valid: {', '.join(map(str, check['choices']))}"
        )
    for key, (sign, ok) in _BOUNDS.items():
        if key in check and not ok(value, check[key]):
            raise SparsebenchError(f"{what} must be {sign} {check[key]}, got {value!r}")
    return value


def build_dataclass(cls: type[T], kwargs: dict[str, Any], what: str) -> T:
    """Instantiate a config dataclass: unknown keys get a did-you-mean error, every value is
    checked against its annotation and `option(...)` range before the class sees it."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    allowed = list(fields)
    values = {}
    for key, value in kwargs.items():
        if key not in fields:
            raise SparsebenchError(
                f"{what} has no option '{key}'{did_you_mean(key, allowed)}; valid: "
                f"{', '.join(allowed) or '(none)'}"
            )
        check = dict(fields[key].metadata.get("check", {}))
        values[key] = check_value(value, hints.get(key, Any), f"{what} option '{key}'", **check)
    return cls(**values)


METHODS = Registry("method")
