"""Registries: one per kind of component (variants, distillation losses, model families), in the
style of timm's ``register_model`` / ``list_models`` and fvcore's ``Registry``.

A registry maps a name to a function plus a one-line description taken from the function's
docstring. Names are matched with shell-style wildcards by :meth:`Registry.list`.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class Entry:
    name: str
    #: the registered function (variants, losses) or object (model families, executors)
    fn: Any
    description: str
    #: labels given at registration; the first is the entry's family (``variants.zoo.FAMILIES``)
    tags: tuple[str, ...] = ()

    @property
    def family(self) -> str | None:
        return self.tags[0] if self.tags else None


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists close matches."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str | None = None, *, tags: tuple[str, ...] = ()):
        """Decorator: ``@REG.register()`` (name = function name with '_' -> '-') or ``@REG.register("x")``."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            doc = (fn.__doc__ or "").strip().splitlines()
            self.add(name or fn.__name__.replace("_", "-"), fn, doc[0] if doc else "", tags)
            return fn

        return deco

    def add(self, name: str, obj: Any, description: str = "", tags: tuple[str, ...] = ()) -> None:
        """Register ``obj`` (a function, or any object the registry's kind holds) under ``name``."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, obj, description, tuple(tags))

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._entries))})"
            ) from None

    def list(self, pattern: str | list[str] = "*") -> list[str]:
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        return sorted(n for n in self._entries if any(fnmatch.fnmatchcase(n, p) for p in patterns))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[n] for n in sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


#: every registered variant (:mod:`variants.zoo` fills it)
VARIANTS = Registry("variant")
register_variant = VARIANTS.register
