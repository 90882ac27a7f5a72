"""Rego evaluation with regopy (rego-cpp): compiling bundles and answering Data API queries.

Each bundle is compiled once into a regopy bundle whose entrypoints are every
package and rule path its modules declare (and every top-level data path), so
an Evaluate of one of those paths runs a prepared plan. Any other path inside
the bundle's roots falls back to an ad-hoc query of the same modules.

regopy reports compile errors as an s-expression with byte offsets; they are
turned back into ``file:line:col: message`` here so a caller sees what
``opa check`` would say.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from regopy import Interpreter, LogLevel, RegoError  # type: ignore[import-untyped]


class CompileError(Exception):
    """A module that does not compile; ``errors`` are ``(module path, line, col, message)``."""

    def __init__(self, errors: Sequence[tuple[str, int, int, str]]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(f"{m}:{line}:{col}: {msg}" for m, line, col, msg in errors))


class EvaluationError(Exception):
    """The policy engine failed while evaluating (e.g. a rule with conflicting values)."""


_PACKAGE = re.compile(r"^package\s+([A-Za-z_][\w.]*)\s*$", re.M)
# A rule head at the start of a line: `name`, `default name`, followed by
# `:=`, `=`, `if`, `contains`, `{`, `[` or the end of the line.
_RULE = re.compile(r"^(?:default\s+)?([A-Za-z_]\w*)\s*(?=:=|=|\bif\b|\bcontains\b|\{|\[|$)", re.M)
_KEYWORDS = {"package", "import", "default", "not", "some", "every", "with", "else"}
_SEGMENT = re.compile(r"^[\w-]+$")


def _quiet(interp: Interpreter) -> Interpreter:
    # rego-cpp prints compile errors on stdout at the default level; the
    # caller gets them as a CompileError instead.
    interp.log_level = LogLevel.NONE
    return interp


def package_path(source: str) -> str:
    """The slash path of a module's package ('' if it declares none)."""
    m = _PACKAGE.search(source)
    return m.group(1).replace(".", "/") if m else ""


def declared_paths(source: str) -> set[str]:
    """The package path and every top-level rule path a module declares."""
    pkg = package_path(source)
    if not pkg:
        return set()
    out = {pkg}
    parts = pkg.split("/")
    out.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for m in _RULE.finditer(source):
        name = m.group(1)
        if name not in _KEYWORDS:
            out.add(f"{pkg}/{name}")
    return out


def _compile_errors(err: RegoError, sources: Mapping[str, str]) -> CompileError:
    """Turn regopy's error s-expression into file:line:col messages."""
    text = str(err)
    found: list[tuple[str, int, int, str]] = []
    for m in re.finditer(r"\(error (\d+):", text):
        at = m.end()
        name_len = int(m.group(1))
        name = text[at : at + name_len]
        rest = text[at + name_len :]
        loc = re.match(r"\|(\d+)\|(\d+)", rest)
        msg = re.search(r"\(errormsg (\d+):", rest)
        message = rest[msg.end() : msg.end() + int(msg.group(1))] if msg else "compile error"
        line = col = 0
        if loc and name in sources:
            offset = int(loc.group(1))
            prefix = sources[name].encode()[:offset].decode(errors="replace")
            line = prefix.count("\n") + 1
            col = offset - (prefix.rfind("\n") + 1) + 1
        found.append((name, line, col, message))
    return CompileError(found or [("", 0, 0, text.strip() or "compile error")])


def rego_ref(path: str) -> str:
    """``data`` plus the path as a Rego reference: ``a/b-c`` -> ``data.a["b-c"]``."""
    ref = "data"
    for seg in path.split("/"):
        if re.match(r"^[A-Za-z_]\w*$", seg):
            ref += f".{seg}"
        elif seg.isdigit():
            ref += f"[{int(seg)}]"  # an array index, as OPA's Data API reads it
        else:
            ref += f"[{json.dumps(seg)}]"
    return ref


def check_path(path: str) -> str | None:
    """Why ``path`` is not a valid data path, or None."""
    if not path:
        return None
    for seg in path.split("/"):
        if not seg:
            return "empty path segment"
        if not _SEGMENT.match(seg):
            return f"segment {seg!r} has characters other than letters, digits, '_' and '-'"
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    """The value of a path: undefined, or defined with a JSON value."""

    defined: bool
    value: Any = None


class CompiledBundle:
    """A bundle's modules and data, compiled and ready to evaluate."""

    def __init__(self, modules: Mapping[str, str], data: Mapping[str, Any]) -> None:
        self.modules = dict(modules)
        builder = _quiet(Interpreter())
        try:
            for path, source in sorted(self.modules.items()):
                builder.add_module(path, source)
            builder.add_data_json(json.dumps(dict(data)))
            entrypoints: set[str] = set(data)
            for source in self.modules.values():
                entrypoints |= declared_paths(source)
            self.entrypoints = frozenset(entrypoints)
            self._plan = builder.build(None, sorted(self.entrypoints) or ["_"])
        except RegoError as err:
            raise _compile_errors(err, self.modules) from None
        if not self._plan.ok():
            raise CompileError([("", 0, 0, "the bundle did not build")])
        self._runner = _quiet(Interpreter())
        # Paths that are not entrypoints (deeper into a rule's value, or into
        # data) are answered by a query against the same modules.
        self._adhoc = builder

    def evaluate(self, path: str, input_doc: Mapping[str, Any]) -> Decision:
        """The value of ``data.<path>`` for ``input_doc``."""
        if path in self.entrypoints:
            runner = self._runner
            runner.set_input(input_doc)
            out = runner.query_bundle_entrypoint(self._plan, path)
        else:
            runner = self._adhoc
            runner.set_input(input_doc)
            out = runner.query(rego_ref(path) if path else "data")
        if not out.results:
            raise EvaluationError(
                f"evaluating data.{path.replace('/', '.')} failed in the policy engine "
                "(for example a complete rule or function with conflicting values)"
            )
        expressions = out.results[0].expressions
        if not expressions:
            return Decision(False)
        return Decision(True, expressions[0])


@dataclass(frozen=True, slots=True)
class CaseResult:
    """One policy test case: its name, whether it passed, and what came back."""

    module: str
    name: str
    passed: bool
    detail: str = ""


def _includes(got: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(got, dict) and all(
            k in got and _includes(got[k], v) for k, v in want.items()
        )
    if isinstance(want, list) and isinstance(got, list):
        return all(any(_includes(g, w) for g in got) for w in want)
    return bool(got == want)


def run_cases(
    modules: Mapping[str, str], data: Mapping[str, Any], tests: Mapping[str, str]
) -> list[CaseResult]:
    """Run the case tables of ``tests`` (``*_test.rego``) against a bundle's modules.

    Each module's package declares ``cases``: objects with ``name``,
    ``query`` (a data path), ``input`` and one of ``want`` (the exact
    value; ``null`` for undefined), ``includes`` (members the set or array
    result must have) or ``includes_keys`` (fields the object must have).
    """
    compiled = CompiledBundle(modules, data)
    out: list[CaseResult] = []
    for path, source in sorted(tests.items()):
        table = CompiledBundle({path: source}, {})
        pkg = package_path(source)
        got_cases = table.evaluate(f"{pkg}/cases", {})
        if not got_cases.defined or not isinstance(got_cases.value, list):
            out.append(
                CaseResult(
                    path, "(cases)", False, f"data.{pkg.replace('/', '.')}.cases is not a list"
                )
            )
            continue
        for i, case in enumerate(got_cases.value):
            name = str(case.get("name", f"case {i}"))
            try:
                decision = compiled.evaluate(str(case["query"]).strip("/"), case.get("input") or {})
            except (EvaluationError, KeyError) as err:
                out.append(CaseResult(path, name, False, f"error: {err}"))
                continue
            got = decision.value if decision.defined else None
            if "want" in case:
                ok = got == case["want"]
            elif "includes" in case:
                ok = _includes(got, list(case["includes"]))
            elif "includes_keys" in case:
                ok = _includes(got, dict(case["includes_keys"]))
            else:
                out.append(CaseResult(path, name, False, "the case has no want/includes"))
                continue
            out.append(CaseResult(path, name, ok, "" if ok else f"got {json.dumps(got)}"))
    return out


_WITH = re.compile(r"\bwith\s+(input|data)\b")


def unsupported(source: str) -> str | None:
    """A construct this engine cannot run safely, or None.

    rego-cpp 1.5 crashes the process on many uses of ``with`` (a segfault,
    not an error), so modules that use it are refused up front.
    """
    for n, line in enumerate(source.splitlines(), 1):
        code = line.split("#", 1)[0]
        m = _WITH.search(code)
        if m:
            return (
                f"line {n}: `with {m.group(1)}` is not supported by this policy engine (rego-cpp)"
            )
    return None
