"""One registry per extension point: estimators (``hessian.ESTIMATOR_REGISTRY``), selection strategies
(``strategies.STRATEGY_REGISTRY``), unlearning rules (``rules.RULE_REGISTRY``) and forget objectives
(``forget.OBJECTIVE_REGISTRY``).

A registry maps a name to the entry that implements it; the public name tuples (``ESTIMATORS``, ``STRATEGIES``,
``METHODS``) are its keys in registration order. Looking up a name that is not registered raises ValueError naming
the extension point and listing the registered names: there is no if/elif chain behind a name list, so nothing can
fall through to another implementation. docs/layout.md shows how to add an entry.
"""

from typing import Any, Dict, Iterator, Tuple

__all__ = ["Registry"]


class Registry:
    """name -> entry for one extension point (``kind`` names it in errors)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Any] = {}

    def register(self, name: str, entry: Any) -> Any:
        """Add ``entry`` under ``name`` (a non-empty str not registered yet) and return it."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} name must be a non-empty str, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> Any:
        """Remove ``name`` and return its entry (a plugin's or a test's own; ValueError if it is not registered)."""
        entry = self[name]
        del self._entries[name]
        return entry

    def __getitem__(self, name: str) -> Any:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.names()}") from None

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:  # an unhashable name is not registered
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> Tuple[str, ...]:
        return tuple(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
