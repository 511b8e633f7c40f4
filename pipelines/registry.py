"""One small name -> object registry for every kind of plug-in (pipeline backends, dataset formats, ...).

Plug-ins register themselves when their module is imported, so a registry refuses a
second object under a taken name (two modules would otherwise silently replace each
other, depending on import order). Looking up an unknown name raises the registry's own
`UserError` subclass with one line that says which setting was wrong, the closest known
name and the known names, so a command line can print it as it is.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar, overload

from pipelines.errors import UserError, did_you_mean

T = TypeVar("T")


class UnknownNameError(UserError):
    """A name that no plug-in of this kind registered (for registries that name no error type of their own)."""


class Registry(Generic[T]):
    """Objects of one kind by name, plus optional aliases that resolve to a registered name.

    `kind` is what the objects are ("backend", "dataset format"); `setting` the config key or
    option that names one ("data.pipeline", "--backend"), which prefixes the lookup error;
    `error` the `UserError` subclass raised for an unknown name.
    """

    def __init__(self, kind: str, setting: str = "", error: type[UserError] = UnknownNameError) -> None:
        self.kind = kind
        self.setting = setting
        self.error = error
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    @overload
    def register(self, obj: T, *, name: str | None = None, aliases: Iterable[str] = ()) -> T: ...

    @overload
    def register(self, *, name: str | None = None, aliases: Iterable[str] = ()) -> Callable[[T], T]: ...

    def register(self, obj: Any = None, *, name: str | None = None, aliases: Iterable[str] = ()) -> Any:
        """Add `obj` under `name` (default: `obj.name`) and return it; without `obj`, a decorator that does so."""
        if obj is None:
            return lambda target: self.register(target, name=name, aliases=aliases)
        key = name if name is not None else getattr(obj, "name", None)
        if not isinstance(key, str) or not key:
            raise TypeError(f"{self.kind} {obj!r}: pass name= or give it a non-empty `name` attribute")
        aliases = tuple(aliases)
        for taken in (key, *aliases):
            if taken in self:
                raise ValueError(f"{self.kind} {taken!r} registered twice")
        self._items[key] = obj
        self._aliases.update(dict.fromkeys(aliases, key))
        return obj

    def resolve(self, name: str) -> str:
        """The registered name `name` stands for (itself unless it is an alias); unknown names raise `error`."""
        name = self._aliases.get(name, name)
        if name not in self._items:
            prefix = f"{self.setting}: " if self.setting else ""
            hint = did_you_mean(name, self._items)
            raise self.error(f"{prefix}unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())})")
        return name

    def get(self, name: str) -> T:
        return self._items[self.resolve(name)]

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names (aliases left out) matching the shell-style `pattern`, sorted."""
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
