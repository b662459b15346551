"""Name -> class registries with did-you-mean errors (lm-eval-harness style)."""
from __future__ import annotations

import dataclasses
import difflib
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
        if name not in self._items:
            raise SparsebenchError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self.names())}; "
                f"valid: {', '.join(self.names())}"
            )
        return self._items[name]

    def build(self, name: str, kwargs: dict[str, Any]) -> Any:
        return build_dataclass(self.get(name), kwargs, f"{self.kind} '{name}'")


def build_dataclass(cls: type[T], kwargs: dict[str, Any], what: str) -> T:
    """Instantiate a config dataclass, rejecting unknown keys with a did-you-mean hint."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    allowed = list(fields)
    for key, value in kwargs.items():
        if key not in fields:
            raise SparsebenchError(
                f"{what} has no option '{key}'{did_you_mean(key, allowed)}; valid: {', '.join(allowed) or '(none)'}"
            )
        # a switch given as "maybe" or 1 would otherwise pass as truthy without a word
        if fields[key].type in (bool, "bool") and not isinstance(value, bool):
            raise SparsebenchError(f"{what} option '{key}' must be true or false, got {value!r}")
    return cls(**kwargs)


METHODS = Registry("method")
