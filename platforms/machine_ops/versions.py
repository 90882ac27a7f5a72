"""Version comparison as dpkg does it (``dpkg --compare-versions``), and constraints.

``[epoch:]upstream[-revision]``; letters sort before non-letters, ``~``
sorts before everything, even the end of the string. rpm's rpmvercmp
differs in corner cases (``~``/``^``); the same order is used for both.
"""

from __future__ import annotations

import re
from functools import cmp_to_key

_CONSTRAINT = re.compile(r"^\s*(>=|<=|==|!=|=|>|<)?\s*([0-9A-Za-z.+~:-]+)\s*$")


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _cmp_part(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def _split(v: str) -> tuple[int, str, str]:
    epoch = 0
    if ":" in v:
        e, v = v.split(":", 1)
        epoch = int(e) if e.isdigit() else 0
    upstream, _, revision = v.rpartition("-") if "-" in v else (v, "", "")
    return epoch, upstream, revision


def compare(a: str, b: str) -> int:
    """<0, 0 or >0 as version ``a`` sorts before, equal to or after ``b``."""
    ea, ua, ra = _split(a.strip())
    eb, ub, rb = _split(b.strip())
    if ea != eb:
        return ea - eb
    return _cmp_part(ua, ub) or _cmp_part(ra, rb)


version_key = cmp_to_key(compare)


def parse_constraint(text: str) -> tuple[str, str]:
    """``(op, version)`` of e.g. ">=3.0.13" (no operator means "=")."""
    m = _CONSTRAINT.match(text or "")
    if not m:
        raise ValueError(f"not a version constraint: {text!r} (e.g. >=3.0.13)")
    return (m.group(1) or "="), m.group(2)


def satisfies(version: str, op: str, wanted: str) -> bool:
    """Whether ``version op wanted`` holds."""
    c = compare(version, wanted)
    return {
        ">=": c >= 0,
        "<=": c <= 0,
        ">": c > 0,
        "<": c < 0,
        "=": c == 0,
        "==": c == 0,
        "!=": c != 0,
    }[op]
