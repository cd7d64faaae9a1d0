"""A registry with manners: decorator on the definition, duplicates raise,
unknown names answer with the close matches and the full list."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from bench.errors import BenchError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps permanent string keys to objects (classes). Keys are stored in results, so never rename one."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{self.kind} name must be an identifier-like string, got {name!r}")

        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                existing = self._items[name]
                raise BenchError(
                    f"{self.kind} {name!r} is already registered by "
                    f"{getattr(existing, '__module__', '?')}.{getattr(existing, '__qualname__', existing)}; "
                    f"choose another name for {getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"
                )
            self._items[name] = obj
            try:
                obj.name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise BenchError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self._items, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        return f"unknown {self.kind} {name!r}: {hint}known: {', '.join(sorted(self._items))}"

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def unregister(self, name: str) -> None:
        """Remove a key (tests and plugin reloads only)."""
        self._items.pop(name, None)
