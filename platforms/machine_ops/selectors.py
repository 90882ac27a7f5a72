"""Kubernetes label selectors: ``role=web,env in (prod,staging),!legacy,tier!=db``.

The grammar of ``kubectl -l``: comma-joined requirements, each ``k=v``,
``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k`` (exists) or
``!k`` (does not exist). Every requirement must hold.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument

_KEY = r"[A-Za-z0-9][A-Za-z0-9_./-]{0,252}"
_VAL = r"[A-Za-z0-9_.-]{0,63}"
_SET = re.compile(rf"^\s*({_KEY})\s+(in|notin)\s+\(([^)]*)\)\s*$")
_CMP = re.compile(rf"^\s*({_KEY})\s*(==|=|!=)\s*({_VAL})\s*$")
_EXISTS = re.compile(rf"^\s*(!?)\s*({_KEY})\s*$")


@dataclass(frozen=True, slots=True)
class Requirement:
    """One requirement: ``key op values``."""

    key: str
    op: str  # "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` satisfy it."""
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "in":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values


def _split(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p.strip()]


def parse_selector(text: str, field: str = "label_selector") -> tuple[Requirement, ...]:
    """The requirements of ``text``; INVALID_ARGUMENT naming ``field`` when malformed."""
    reqs: list[Requirement] = []
    for part in _split(text or ""):
        if m := _SET.match(part):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            reqs.append(Requirement(m.group(1), m.group(2), values))
        elif m := _CMP.match(part):
            op = "notin" if m.group(2) == "!=" else "in"
            reqs.append(Requirement(m.group(1), op, frozenset({m.group(3)})))
        elif m := _EXISTS.match(part):
            reqs.append(Requirement(m.group(2), "!exists" if m.group(1) else "exists"))
        else:
            raise InvalidArgument(
                f"{field}: cannot parse {part.strip()!r}",
                reason="INVALID_LABEL_SELECTOR",
                field_violations=[FieldViolation(field, f"bad requirement {part.strip()!r}")],
            )
    return tuple(reqs)


def matches(selector: tuple[Requirement, ...], labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` satisfy every requirement (an empty selector matches all)."""
    return all(r.matches(labels) for r in selector)


def check_labels(labels: Mapping[str, str], field: str) -> None:
    """INVALID_ARGUMENT unless every key and value is a valid Kubernetes label."""
    bad = [
        FieldViolation(f"{field}.{k}", "not a valid label key or value")
        for k, v in labels.items()
        if not re.fullmatch(_KEY, k) or not re.fullmatch(_VAL, v)
    ]
    if bad:
        raise InvalidArgument("invalid labels", reason="INVALID_LABELS", field_violations=bad)
