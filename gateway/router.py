"""Finds the binding of a request: HTTP method plus raw path to RPC and path values.

Bindings are indexed by HTTP method, segment count and verb, so a lookup tries
only the few templates of the right shape; among those the most literal one
wins, and a template with a ``:verb`` wins over one without. A path that
matches under another method is "method not allowed" (405, with ``Allow``),
not "not found".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from autoecoops.gateway.rules import Binding
from autoecoops.gateway.templates import PathDecodeError


class NoRoute(LookupError):
    """No binding has this path (404)."""


class MethodNotAllowed(LookupError):
    """Bindings have this path, but under other HTTP methods (405)."""

    def __init__(self, allowed: list[str]) -> None:
        super().__init__(", ".join(allowed))
        self.allowed = allowed


@dataclass(frozen=True, slots=True)
class Match:
    """A binding and the raw-decoded values of its path variables."""

    binding: Binding
    values: dict[str, str]


# Key of the index: (segment count or -1 for templates ending in '**', verb).
_Key = tuple[int, str]


class Router:
    """Routes (method, raw path) to a binding."""

    def __init__(self, bindings: Iterable[Binding]) -> None:
        self.bindings = list(bindings)
        index: dict[str, dict[_Key, list[Binding]]] = defaultdict(lambda: defaultdict(list))
        for b in self.bindings:
            t = b.template
            index[b.http_method][(-1 if t.has_double_star else len(t.segments), t.verb)].append(b)
        for by_key in index.values():
            for routes in by_key.values():
                routes.sort(key=lambda b: -b.template.literal_count)
        self._index = {m: dict(k) for m, k in index.items()}

    @property
    def methods(self) -> list[str]:
        """Every HTTP method some binding uses."""
        return sorted(self._index)

    def match(self, method: str, raw_path: str) -> Match:
        """The binding for ``method raw_path``; raise ``NoRoute`` or ``MethodNotAllowed``.

        ``raw_path`` is the path as sent, still percent-encoded, without the
        query. Raises ``templates.PathDecodeError`` when a matching variable
        does not decode to UTF-8.
        """
        found = self._find(method, raw_path)
        if found is not None:
            return found
        allowed = self.allowed(raw_path)
        if allowed:
            raise MethodNotAllowed(allowed)
        raise NoRoute(raw_path)

    def allowed(self, raw_path: str) -> list[str]:
        """The HTTP methods some binding serves at ``raw_path`` (for CORS and 405)."""
        out = []
        for method in sorted(self._index):
            try:
                if self._find(method, raw_path) is not None:
                    out.append(method)
            except PathDecodeError:
                out.append(method)
        return out

    def _find(self, method: str, raw_path: str) -> Match | None:
        by_key = self._index.get(method)
        if by_key is None or not raw_path.startswith("/"):
            return None
        parts = raw_path[1:].split("/")
        head, colon, verb = parts[-1].rpartition(":")
        if colon:
            # A template with this verb matches the path without it.
            trimmed = [*parts[:-1], head]
            found = self._scan(by_key, trimmed, verb)
            if found is not None:
                return found
        return self._scan(by_key, parts, "")

    @staticmethod
    def _scan(by_key: dict[_Key, list[Binding]], parts: list[str], verb: str) -> Match | None:
        for key in ((len(parts), verb), (-1, verb)):
            for b in by_key.get(key, ()):
                values = b.template.match(parts)
                if values is not None:
                    return Match(b, values)
        return None
