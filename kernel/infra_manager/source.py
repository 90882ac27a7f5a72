"""Desired state from Git, read with dulwich (pure Python, no git binary needed).

A source is a repository URL, a revision (branch, tag, commit or HEAD) and a
directory. Remote repositories (https, ssh, git, file://) are mirrored into a
bare repository under the cache directory and fetched at most once per
``fetch_interval``; a plain local path is opened in place. Reading returns
the bytes of every ``.yaml``, ``.yml`` and ``.json`` file under the path at
that commit, straight from the object store: nothing is checked out.

Every failure is a ``GitError`` whose ``kind`` says which part of the source
is wrong, so the caller can name the field.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dulwich.client import get_transport_and_path
from dulwich.errors import GitProtocolError, HangupException, NotGitRepository
from dulwich.object_store import tree_lookup_path
from dulwich.objects import Blob, Commit, Tag, Tree
from dulwich.repo import Repo

#: Manifest files; everything else in the tree is ignored (READMEs, scripts).
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
_HEX = re.compile(r"^[0-9a-f]{4,40}$")
_SCP = re.compile(r"^[\w.-]+@[\w.-]+:[^/].*$")
_REMOTE_SCHEMES = ("https", "http", "ssh", "git", "file")
_GITLINK, _SYMLINK = 0o160000, 0o120000


class GitError(Exception):
    """A source that cannot be read; ``kind`` is url, unreachable, revision or path."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True, slots=True)
class Location:
    """How a repository URL is reached: opened in place, or mirrored."""

    url: str
    #: The directory of a local repository, or of the mirror of a remote one.
    path: Path
    remote: bool
    local: bool


def classify(url: str, cache_dir: Path) -> Location:
    """Where ``url`` is read from; ``GitError('url')`` for a malformed URL."""
    text = url.strip()
    if not text or any(c.isspace() for c in text):
        raise GitError("url", f"{url!r} is not a repository URL")
    if _SCP.match(text):
        return Location(text, _mirror_dir(cache_dir, text), remote=True, local=False)
    parsed = urlparse(text)
    if parsed.scheme in _REMOTE_SCHEMES:
        if parsed.scheme == "file":
            if not parsed.path:
                raise GitError("url", f"{url!r}: a file:// URL needs a path")
            return Location(text, _mirror_dir(cache_dir, text), remote=True, local=True)
        if not parsed.hostname:
            raise GitError("url", f"{url!r}: no host")
        return Location(text, _mirror_dir(cache_dir, text), remote=True, local=False)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise GitError(
            "url", f"{url!r}: scheme {parsed.scheme!r} is not one of {', '.join(_REMOTE_SCHEMES)}"
        )
    if not text.startswith("/"):
        raise GitError("url", f"{url!r}: a local repository must be an absolute path")
    return Location(text, Path(text), remote=False, local=True)


def _mirror_dir(cache_dir: Path, url: str) -> Path:
    return cache_dir / (hashlib.sha256(url.encode()).hexdigest()[:24] + ".git")


class GitSource:
    """Resolves revisions and reads manifest files, for any number of repositories.

    Methods block (disk and network); the caller runs them in a thread. One
    lock per repository keeps dulwich's non-thread-safe objects to one user.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        allow_local: bool = True,
        fetch_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache_dir = cache_dir
        self.allow_local = allow_local
        self.fetch_interval = fetch_interval
        self._clock = clock
        self._repos: dict[str, Repo] = {}
        self._fetched: dict[str, float] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def location(self, url: str) -> Location:
        """Classify ``url`` and apply the local-repository policy."""
        loc = classify(url, self.cache_dir)
        if loc.local and not self.allow_local:
            raise GitError(
                "url",
                f"{url!r}: local repositories are disabled on this server "
                "(AUTOECOOPS_INFRA_MANAGER_ALLOW_LOCAL_REPOS=false)",
            )
        return loc

    def _lock(self, url: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(url, threading.Lock())

    def resolve(self, url: str, revision: str = "", *, refresh: bool = False) -> str:
        """The commit id (40 hex) ``revision`` names in ``url`` right now."""
        loc = self.location(url)
        with self._lock(loc.url):
            repo = self._open(loc, refresh=refresh)
            try:
                return _resolve(repo, revision)
            except GitError:
                if not loc.remote or refresh:
                    raise
            # A remote branch or commit we have not seen yet: fetch once more.
            repo = self._open(loc, refresh=True)
            return _resolve(repo, revision)

    def read(self, url: str, commit: str, path: str) -> dict[str, bytes]:
        """Every manifest file under ``path`` at ``commit``: {path in repo: bytes}."""
        loc = self.location(url)
        with self._lock(loc.url):
            repo = self._open(loc, refresh=False)
            obj = _get(repo, commit.encode())
            if not isinstance(obj, Commit):
                raise GitError("revision", f"{commit} is not a commit in {url}")
            clean = path.strip("/")
            tree_id = obj.tree
            if clean:
                try:
                    _mode, tree_id = tree_lookup_path(
                        repo.object_store.__getitem__, obj.tree, clean.encode()
                    )
                except KeyError:
                    raise GitError(
                        "path", f"path {clean!r} does not exist at {commit[:12]} in {url}"
                    ) from None
            out: dict[str, bytes] = {}
            node = repo.object_store[tree_id]
            if isinstance(node, Blob):
                out[clean] = node.as_raw_string()
            elif isinstance(node, Tree):
                _walk(repo, node, clean, out)
            else:
                raise GitError("path", f"path {clean!r} is neither a file nor a directory")
            return out

    def entries(self, url: str, commit: str, path: str) -> set[str]:
        """The names in directory ``path`` at ``commit`` (empty for a file); how a source's kind is told."""
        loc = self.location(url)
        with self._lock(loc.url):
            repo = self._open(loc, refresh=False)
            node = repo.object_store[self._tree(repo, url, commit, path)]
            if not isinstance(node, Tree):
                return set()
            return {e.path.decode("utf-8", "replace") for e in node.items()}

    def export(self, url: str, commit: str, dest: Path) -> None:
        """Write the whole tree at ``commit`` under ``dest`` (Helm and Kustomize read files).

        The whole repository, not only the path: an overlay names ``../base``,
        a chart's values file may live elsewhere. Symlinks and submodules are
        left out, so nothing outside ``dest`` can be reached through the tree.
        """
        loc = self.location(url)
        with self._lock(loc.url):
            repo = self._open(loc, refresh=False)
            root = repo.object_store[self._tree(repo, url, commit, "")]
            assert isinstance(root, Tree)
            _export(repo, root, dest)

    def _tree(self, repo: Repo, url: str, commit: str, path: str) -> Any:
        obj = _get(repo, commit.encode())
        if not isinstance(obj, Commit):
            raise GitError("revision", f"{commit} is not a commit in {url}")
        clean = path.strip("/")
        if not clean:
            return obj.tree
        try:
            _mode, sha = tree_lookup_path(repo.object_store.__getitem__, obj.tree, clean.encode())
        except KeyError:
            raise GitError(
                "path", f"path {clean!r} does not exist at {commit[:12]} in {url}"
            ) from None
        return sha

    def close(self) -> None:
        """Close every open repository (their pack files)."""
        with self._guard:
            repos, self._repos = list(self._repos.values()), {}
        for repo in repos:
            repo.close()

    def _open(self, loc: Location, *, refresh: bool) -> Repo:
        repo = self._repos.get(loc.url)
        if not loc.remote:
            if repo is None:
                try:
                    repo = Repo(str(loc.path))
                except (NotGitRepository, FileNotFoundError, NotADirectoryError):
                    raise GitError(
                        "unreachable", f"{loc.url!r} is not a Git repository on this machine"
                    ) from None
                self._repos[loc.url] = repo
            return repo
        last = self._fetched.get(loc.url)
        if repo is None or refresh or last is None or self._clock() - last >= self.fetch_interval:
            repo = self._fetch(loc, repo)
            self._repos[loc.url] = repo
            self._fetched[loc.url] = self._clock()
        return repo

    def _fetch(self, loc: Location, repo: Repo | None) -> Repo:
        """Mirror every branch and tag of a remote into the bare repository at ``loc.path``."""
        created = False
        if repo is None:
            if (loc.path / "HEAD").exists():
                repo = Repo(str(loc.path))
            else:
                loc.path.mkdir(parents=True, exist_ok=True)
                repo = Repo.init_bare(str(loc.path))
                created = True
        try:
            try:
                client, remote_path = get_transport_and_path(loc.url)
                result = client.fetch(remote_path, repo)
            except (GitProtocolError, HangupException, NotGitRepository, OSError) as err:
                raise GitError("unreachable", f"cannot fetch {loc.url}: {err}") from None
            except Exception as err:
                # dulwich raises assorted errors for a missing local path or a
                # refused connection; none of them may escape as INTERNAL.
                raise GitError("unreachable", f"cannot fetch {loc.url}: {err}") from None
            wanted = {
                ref: sha
                for ref, sha in (result.refs or {}).items()
                if sha and (ref.startswith(b"refs/heads/") or ref.startswith(b"refs/tags/"))
            }
            if not wanted:
                raise GitError("unreachable", f"{loc.url} has no branches (an empty repository?)")
        except GitError:
            if created:
                # A first fetch that failed leaves nothing behind: no empty
                # mirror per bad URL under the data directory.
                repo.close()
                shutil.rmtree(loc.path, ignore_errors=True)
            raise
        for ref in list(repo.refs.keys()):
            if ref.startswith((b"refs/heads/", b"refs/tags/")) and ref not in wanted:
                del repo.refs[ref]  # mirror: a deleted remote branch goes here too
        for ref, sha in wanted.items():
            repo.refs[ref] = sha
        symrefs: dict[Any, Any] = dict(result.symrefs or {})
        head = symrefs.get(b"HEAD")
        if head and head in wanted:
            repo.refs.set_symbolic_ref(_b(b"HEAD"), head)
        return repo


def _b(raw: bytes) -> Any:
    """Bytes as dulwich's ref and object-id types (NewTypes of bytes in recent releases)."""
    return raw


def _get(repo: Repo, sha: bytes) -> object:
    try:
        return repo.object_store[_b(sha)]
    except (KeyError, ValueError):
        raise GitError("revision", f"commit {sha.decode()} is not in the repository") from None


def _peel(repo: Repo, sha: bytes) -> Commit | None:
    obj = _get(repo, sha)
    while isinstance(obj, Tag):
        obj = _get(repo, obj.object[1])
    return obj if isinstance(obj, Commit) else None


def _resolve(repo: Repo, revision: str) -> str:
    rev = revision.strip()
    candidates: list[bytes] = []
    if rev in ("", "HEAD"):
        try:
            candidates.append(repo.refs[_b(b"HEAD")])
        except KeyError:
            raise GitError("revision", "the repository has no HEAD (no commits?)") from None
    else:
        for ref in (f"refs/heads/{rev}", f"refs/tags/{rev}", rev):
            try:
                candidates.append(repo.refs[_b(ref.encode())])
            except (KeyError, ValueError):
                continue
    for sha in candidates:
        commit = _peel(repo, sha)
        if commit is not None:
            return commit.id.decode()
    if _HEX.match(rev):
        if len(rev) == 40:
            try:
                commit = _peel(repo, rev.encode())
            except GitError:
                commit = None
            if commit is not None:
                return commit.id.decode()
        else:
            matches = (
                [sha for sha in repo.object_store if sha.decode().startswith(rev)]
                if len(rev) >= 7
                else []
            )
            commits = [c for c in (_peel(repo, s) for s in matches) if c is not None]
            if len(commits) == 1:
                return commits[0].id.decode()
            if len(commits) > 1:
                raise GitError("revision", f"revision {rev!r} is ambiguous")
    raise GitError("revision", f"revision {rev!r} is not a branch, tag or commit of the repository")


def _walk(repo: Repo, tree: Tree, prefix: str, out: dict[str, bytes]) -> None:
    for entry in tree.items():
        name = entry.path.decode("utf-8", "replace")
        full = f"{prefix}/{name}" if prefix else name
        if entry.mode in (_GITLINK, _SYMLINK):
            continue  # a submodule's commit is not here; a symlink's blob is its target
        obj = repo.object_store[entry.sha]
        if isinstance(obj, Tree):
            _walk(repo, obj, full, out)
        elif isinstance(obj, Blob) and name.endswith(MANIFEST_SUFFIXES):
            out[full] = obj.as_raw_string()


def _export(repo: Repo, tree: Tree, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for entry in tree.items():
        name = entry.path.decode("utf-8", "replace")
        if entry.mode in (_GITLINK, _SYMLINK) or name in (".", "..") or "/" in name:
            continue
        obj = repo.object_store[entry.sha]
        if isinstance(obj, Tree):
            _export(repo, obj, dest / name)
        elif isinstance(obj, Blob):
            (dest / name).write_bytes(obj.as_raw_string())
