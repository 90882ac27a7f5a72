"""Rendering a source into documents: plain YAML, Helm charts and Kustomize overlays.

The kind of a source is Argo CD's rule: ``source.helm`` set or a
``Chart.yaml`` in the path makes it a Helm chart, ``source.kustomize`` set or
a ``kustomization.yaml`` makes it a Kustomize overlay, anything else is a
directory of plain manifests. Charts and overlays are rendered by the real
tools (``helm template``, ``kubectl kustomize`` or ``kustomize build``), run
on a copy of the repository at the commit, never on a working tree, and with
their caches and config in that copy, so nothing leaks between renders. A
tool that is not installed is ``ToolMissing`` (FAILED_PRECONDITION naming
it); a chart or overlay the tool refuses is a ``ManifestError`` carrying the
tool's own message.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from autoecoops.kernel.infra_manager.manifests import (
    Document,
    ManifestError,
    parse_files,
    parse_stream,
)
from autoecoops.kernel.infra_manager.model import HelmSource, KustomizeSource, Source
from autoecoops.kernel.infra_manager.source import GitSource
from autoecoops.kernel.mesh.errors import FieldViolation

CHART_FILE = "Chart.yaml"
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
#: helm's template header naming the file a document came from.
_SOURCE_LINE = re.compile(r"^# Source: (\S.*?)\s*$", re.MULTILINE)
#: Bytes of a tool's stderr kept in an error (a chart can print pages).
_STDERR_LIMIT = 2000


class SourceKind(StrEnum):
    """How a source's path is turned into manifests."""

    DIRECTORY = "Directory"
    HELM = "Helm"
    KUSTOMIZE = "Kustomize"


class ToolMissing(Exception):
    """A rendering tool is not installed (or not where it was configured)."""

    def __init__(self, tool: str, setting: str, kind: SourceKind) -> None:
        super().__init__(
            f"{kind.value} sources need {tool}, which is not on this server's PATH "
            f"(install it or set {setting})"
        )
        self.tool = tool
        self.setting = setting
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Tools:
    """Where the rendering tools are: a path or a name looked up on PATH."""

    helm: str = ""
    kubectl: str = ""
    #: When set, ``kustomize build`` is used instead of ``kubectl kustomize``.
    kustomize: str = ""
    #: Seconds one render may take.
    timeout: float = 60.0


def source_kind(source: Source, names: set[str]) -> SourceKind:
    """The kind of ``source``, from its options and the names in its directory."""
    if source.helm is not None:
        return SourceKind.HELM
    if source.kustomize is not None:
        return SourceKind.KUSTOMIZE
    if CHART_FILE in names:
        return SourceKind.HELM
    if any(n in names for n in KUSTOMIZATION_FILES):
        return SourceKind.KUSTOMIZE
    return SourceKind.DIRECTORY


def _which(configured: str, default: str) -> str | None:
    """The configured path, else ``default`` on PATH, else where this install keeps tools.

    Besides PATH: the environment's own ``bin`` (the image copies helm and
    kubectl into /opt/autoecoops/bin) and ``.build/tools`` of the checkout
    whose ``.venv`` runs us (where ``./dev`` installs them), so a plain
    ``autoecoops up`` finds what ``./dev up`` installed.
    """
    name = configured or default
    if "/" in name:
        return name if os.access(name, os.X_OK) and Path(name).is_file() else None
    found = shutil.which(name)
    if found is not None or configured:
        return found
    for folder in (Path(sys.prefix) / "bin", Path(sys.prefix).parent / ".build" / "tools"):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


class Renderer:
    """Turns a source at a commit into documents. Blocking: run it in a thread."""

    def __init__(self, git: GitSource, tools: Tools) -> None:
        self.git = git
        self.tools = tools

    def kind(self, source: Source, commit: str) -> SourceKind:
        """The kind of ``source`` at ``commit``."""
        if source.helm is not None or source.kustomize is not None:
            return source_kind(source, set())
        return source_kind(source, self.git.entries(source.repo_url, commit, source.path))

    def documents(
        self,
        source: Source,
        commit: str,
        *,
        release: str,
        namespace: str,
        kube_version: str = "",
    ) -> list[Document]:
        """The documents of ``source`` at ``commit``; ``release``/``namespace`` are Helm's defaults."""
        kind = self.kind(source, commit)
        if kind is SourceKind.DIRECTORY:
            return parse_files(self.git.read(source.repo_url, commit, source.path))
        if kind is SourceKind.HELM:
            helm = _which(self.tools.helm, "helm")
            if helm is None:
                raise ToolMissing("helm", "AUTOECOOPS_INFRA_MANAGER_HELM", kind)
            with tempfile.TemporaryDirectory(prefix="autoecoops-render-") as tmp:
                root = Path(tmp) / "repo"
                self.git.export(source.repo_url, commit, root)
                return render_helm(
                    helm,
                    root,
                    source.path,
                    source.helm or HelmSource(),
                    release=release,
                    namespace=namespace,
                    kube_version=kube_version,
                    timeout=self.tools.timeout,
                )
        if self.tools.kustomize:
            kustomize = _which(self.tools.kustomize, "kustomize")
            if kustomize is None:
                raise ToolMissing("kustomize", "AUTOECOOPS_INFRA_MANAGER_KUSTOMIZE", kind)
            command = [kustomize, "build"]
        else:
            kubectl = _which(self.tools.kubectl, "kubectl")
            if kubectl is not None:
                command = [kubectl, "kustomize"]
            else:
                found = shutil.which("kustomize")
                if found is None:
                    raise ToolMissing(
                        "kubectl (or kustomize)", "AUTOECOOPS_INFRA_MANAGER_KUBECTL", kind
                    )
                command = [found, "build"]
        with tempfile.TemporaryDirectory(prefix="autoecoops-render-") as tmp:
            root = Path(tmp) / "repo"
            self.git.export(source.repo_url, commit, root)
            return render_kustomize(
                command, root, source.path, source.kustomize, timeout=self.tools.timeout
            )


def _run(argv: Sequence[str], cwd: Path, home: Path, timeout: float, where: str) -> str:
    """Run a tool; its refusal becomes a ManifestError naming ``where``."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        # Helm keeps caches, config and plugins under these: a private copy per render.
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": str(home / "kubeconfig"),
    }
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            env=env,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ManifestError(
            [FieldViolation(where, f"{Path(argv[0]).name} took longer than {timeout:g}s")]
        ) from None
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip() or f"exit {done.returncode}"
        raise ManifestError([FieldViolation(where, message[:_STDERR_LIMIT])])
    return done.stdout.decode("utf-8", "replace")


def _inside(root: Path, relative: str) -> Path:
    path = (root / relative).resolve()
    if root.resolve() not in (path, *path.parents):
        raise ManifestError([FieldViolation(relative, "is outside the repository")])
    return path


def render_helm(
    helm: str,
    root: Path,
    path: str,
    spec: HelmSource,
    *,
    release: str,
    namespace: str,
    kube_version: str = "",
    timeout: float = 60.0,
) -> list[Document]:
    """``helm template`` of the chart at ``root/path``; documents named by their template."""
    chart_rel = path.strip("/")
    chart = _inside(root, chart_rel or ".")
    if not (chart / CHART_FILE).is_file():
        raise ManifestError(
            [FieldViolation(chart_rel or ".", "a Helm source needs a Chart.yaml in its path")]
        )
    home = root.parent / "home"
    home.mkdir(exist_ok=True)
    argv = [
        helm,
        "template",
        spec.release_name or release,
        str(chart),
        "--namespace",
        spec.namespace or namespace,
    ]
    for i, name in enumerate(spec.value_files):
        file = (
            _inside(root, name.lstrip("/"))
            if name.startswith("/")
            else _inside(root, str(PurePosixPath(chart_rel or ".") / name))
        )
        if not file.is_file():
            if spec.ignore_missing_value_files:
                continue
            raise ManifestError(
                [
                    FieldViolation(
                        f"application.source.helm.value_files[{i}]",
                        f"{name} does not exist in the repository at this revision",
                    )
                ]
            )
        argv += ["--values", str(file)]
    if spec.values.strip():
        inline = home / "inline-values.yaml"
        inline.write_text(spec.values)
        argv += ["--values", str(inline)]
    for p in spec.parameters:
        # helm splits --set on commas; a literal comma in a value is escaped.
        flag = "--set-string" if p.force_string else "--set"
        argv += [flag, f"{p.name}={p.value.replace(',', chr(92) + ',')}"]
    version = spec.kube_version or kube_version
    if version:
        argv += ["--kube-version", version]
    for api in spec.api_versions:
        argv += ["--api-versions", api]
    argv.append("--skip-crds" if spec.skip_crds else "--include-crds")
    out = _run(argv, root, home, timeout, chart_rel or ".")
    return helm_documents(out, chart_rel, _chart_name(chart))


def _chart_name(chart: Path) -> str:
    try:
        meta = yaml.safe_load((chart / CHART_FILE).read_text()) or {}
    except yaml.YAMLError:
        return chart.name
    return str(meta.get("name") or chart.name) if isinstance(meta, dict) else chart.name


def helm_documents(text: str, chart_path: str, chart_name: str) -> list[Document]:
    """The documents of ``helm template`` output, each named by its repository file.

    Helm heads each document with ``# Source: <chart>/templates/x.yaml``; the
    chart's name is replaced by its path in the repository, so the name is a
    file a reader can open. The index counts documents per template.
    """
    docs: list[Document] = []
    bad: list[FieldViolation] = []
    counters: dict[str, int] = {}
    for chunk in _helm_chunks(text):
        found = _SOURCE_LINE.search(chunk)
        template = found.group(1) if found else ""
        if template.startswith(chart_name + "/"):
            template = template[len(chart_name) + 1 :]
        repo_path = str(PurePosixPath(chart_path or ".") / template) if template else chart_path
        parse_stream(repo_path.removeprefix("./"), chunk, docs, bad, lines=False, counters=counters)
    if bad:
        raise ManifestError(bad)
    return docs


def _helm_chunks(text: str) -> list[str]:
    """Helm's output split at its ``---`` lines, so each ``# Source:`` stays with its document."""
    parts = re.split(r"(?m)^---[ \t]*$\n?", text)
    return [p for p in parts if p.strip()]


def _image(text: str) -> dict[str, Any]:
    """A kustomize ``images`` entry from ``kustomize edit set image``'s argument."""
    name, _, new = text.partition("=")
    entry: dict[str, Any] = {}
    target = new or name
    if not new:
        name = _split_image(name)[0]
    entry["name"] = name
    new_name, tag, digest = _split_image(target)
    if new and new_name != name:
        entry["newName"] = new_name
    if tag:
        entry["newTag"] = tag
    if digest:
        entry["digest"] = digest
    return entry


def _split_image(ref: str) -> tuple[str, str, str]:
    """``(name, tag, digest)`` of an image reference (a registry port is not a tag)."""
    name, _, digest = ref.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def render_kustomize(
    command: Sequence[str],
    root: Path,
    path: str,
    spec: KustomizeSource | None,
    *,
    timeout: float = 60.0,
) -> list[Document]:
    """``kubectl kustomize`` (or ``kustomize build``) of the overlay at ``root/path``.

    The application's options go into a small overlay of their own on top, as
    ``kustomize edit`` would write them, so the repository's files are read
    as they are in Git.
    """
    rel = path.strip("/") or "."
    overlay = _inside(root, rel)
    if not any((overlay / n).is_file() for n in KUSTOMIZATION_FILES):
        raise ManifestError(
            [FieldViolation(rel, "a Kustomize source needs a kustomization.yaml in its path")]
        )
    home = root.parent / "home"
    home.mkdir(exist_ok=True)
    target = overlay
    if spec is not None and spec != KustomizeSource():
        target = root.parent / "app-overlay"
        target.mkdir()
        wrapper: dict[str, Any] = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            # `bases` is read by every kustomize (kubectl 1.20 embeds v2, which
            # takes directories only there); newer ones still accept it.
            "bases": [os.path.relpath(overlay, target)],
        }
        if spec.name_prefix:
            wrapper["namePrefix"] = spec.name_prefix
        if spec.name_suffix:
            wrapper["nameSuffix"] = spec.name_suffix
        if spec.namespace:
            wrapper["namespace"] = spec.namespace
        if spec.common_labels:
            wrapper["commonLabels"] = dict(spec.common_labels)
        if spec.common_annotations:
            wrapper["commonAnnotations"] = dict(spec.common_annotations)
        if spec.images:
            wrapper["images"] = [_image(i) for i in spec.images]
        (target / "kustomization.yaml").write_text(yaml.safe_dump(wrapper, sort_keys=False))
    # A wrapper outside the repository copy reaches in through a relative path,
    # which kustomize's default load restrictor allows for resources.
    out = _run([*command, str(target)], root, home, timeout, rel)
    name = next(n for n in KUSTOMIZATION_FILES if (overlay / n).is_file())
    where = str(PurePosixPath(rel) / name).removeprefix("./")
    docs: list[Document] = []
    bad: list[FieldViolation] = []
    parse_stream(where, out, docs, bad, lines=False)
    if bad:
        raise ManifestError(bad)
    return docs
