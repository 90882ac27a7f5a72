"""Reading IaC files into documents that remember where each field came from.

YAML is composed by libyaml (``CSafeLoader``) into nodes, then constructed
into plain Python values; the node tree stays beside the value so a rule
that names a field by its RFC 6901 pointer gets that field's line back, and
a missing field gets the line of its nearest present parent (where the
fix goes). Multi-document files keep each document's index; a directory is
read file by file in sorted order. JSON is YAML here, so a Terraform plan
(``terraform show -json``) keeps its line numbers too.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

try:  # libyaml is ~10x faster; PyYAML falls back to pure Python without it.
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - every wheel we install has libyaml
    _Loader = yaml.SafeLoader

#: File suffixes read from a directory.
SUFFIXES = (".yaml", ".yml", ".json")


class DocumentError(ValueError):
    """A file that is not valid YAML/JSON; carries the file and line."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file = file
        self.line = line
        self.message = message


@dataclass(slots=True)
class Document:
    """One parsed document and the node tree it came from."""

    file: str
    index: int
    data: Any
    node: yaml.Node | None = None
    #: Added to the node's lines: a rendered manifest's line in its source file.
    line_offset: int = 0
    #: For rendered manifests: the line of the document when no node is kept.
    start_line: int = 1
    kind_hint: str = field(default="")

    @property
    def line(self) -> int:
        """The 1-based line where the document starts."""
        if self.node is None:
            return self.start_line
        return self.node.start_mark.line + 1 + self.line_offset

    def line_of(self, pointer: str) -> int:
        """The 1-based line of the field at ``pointer`` (RFC 6901), or of its
        deepest present ancestor when the field itself is missing."""
        node = self.node
        if node is None:
            return self.start_line
        line = node.start_mark.line + 1
        if not pointer:
            return line + self.line_offset
        for raw in pointer.lstrip("/").split("/"):
            token = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == token:
                        line = key.start_mark.line + 1
                        node = value
                        break
                else:
                    break
            elif isinstance(node, yaml.SequenceNode) and token.isdigit():
                i = int(token)
                if i >= len(node.value):
                    break
                node = node.value[i]
                line = node.start_mark.line + 1
            else:
                break
        return line + self.line_offset


_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"
_BOOLS = SafeConstructor.bool_values


def _construct(node: yaml.Node) -> Any:
    """Plain values of a composed document, as SafeLoader builds them.

    The tags are already resolved by the composer, so the common scalars
    (str, int, bool, null) and plain maps and lists are built directly; any
    other tag, and maps with merge keys, go to PyYAML's SafeConstructor.
    This is what makes parse + line map + rules cheaper than ``safe_load``
    alone (bench/bench_iaops.py).
    """
    slow: SafeConstructor | None = None
    memo: dict[int, Any] = {}

    def fallback(n: yaml.Node) -> Any:
        nonlocal slow
        if slow is None:
            slow = SafeConstructor()
        return slow.construct_document(n)

    def build(n: yaml.Node) -> Any:
        tag = n.tag
        if isinstance(n, yaml.ScalarNode):
            value = n.value
            if tag == _STR:
                return value
            if tag == _INT and value.isdigit():
                return int(value)
            if tag == _BOOL:
                return _BOOLS.get(value.lower(), value)
            if tag == _NULL:
                return None
            return fallback(n)
        key = id(n)
        if key in memo:  # an alias: the same node again
            return memo[key]
        if isinstance(n, yaml.MappingNode) and tag == _MAP:
            if any(k.tag == _MERGE for k, _ in n.value):
                return fallback(n)
            out: dict[Any, Any] = {}
            memo[key] = out
            for k, v in n.value:
                out[build(k)] = build(v)
            return out
        if isinstance(n, yaml.SequenceNode) and tag == _SEQ:
            items: list[Any] = []
            memo[key] = items
            items.extend(build(v) for v in n.value)
            return items
        return fallback(n)

    return build(node)


def parse(text: str, file: str, *, line_offset: int = 0) -> list[Document]:
    """Every non-empty document of a YAML/JSON text, with its node tree."""
    docs: list[Document] = []
    # The node trees are kept (for line numbers), so the cyclic GC would scan
    # every node built so far again and again while a big file is read: that
    # tripled the parse. Nodes form no cycles, so refcounting frees them; the
    # collector is paused for the parse only.
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return _parse(text, file, line_offset, docs)
    finally:
        if paused:
            gc.enable()


def _parse(text: str, file: str, line_offset: int, docs: list[Document]) -> list[Document]:
    try:
        loader = _Loader(text)
        try:
            index = 0
            while loader.check_node():
                node = loader.get_node()
                if node is None:
                    continue
                data = _construct(node)
                if data is not None:
                    docs.append(Document(file, index, data, node, line_offset))
                index += 1
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = (mark.line + 1 if mark else 0) + line_offset
        raise DocumentError(file, line, f"{err.problem or err}") from None
    except yaml.YAMLError as err:
        # Some valid JSON (e.g. "\/" escapes) is not YAML 1.1; read it as JSON, without lines.
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise DocumentError(file, 0, str(err)) from None
        return [Document(file, 0, data, None, line_offset)]
    return docs


def collect(
    paths: Iterable[str | os.PathLike[str]], skipped_charts: list[str] | None = None
) -> Iterator[tuple[str, str]]:
    """(path, text) of each file named, or under each directory named (sorted).

    Helm charts (directories with a Chart.yaml) are templates, not manifests:
    they are left out and named in ``skipped_charts``; infra-manager renders
    them (validate the Application instead), so there is one renderer.
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            charts = sorted(c.parent for c in path.rglob("Chart.yaml"))
            if skipped_charts is not None:
                skipped_charts.extend(str(c) for c in charts)
            for child in sorted(path.rglob("*")):
                if any(child.is_relative_to(c) for c in charts):
                    continue
                if child.is_file() and child.suffix in SUFFIXES and not _hidden(child, path):
                    yield str(child), child.read_text(encoding="utf-8")
        elif path.is_file():
            yield str(path), path.read_text(encoding="utf-8")
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")


def _hidden(child: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in child.relative_to(root).parts)
