"""Real Git repositories for tests, made with dulwich in a temporary directory."""

from __future__ import annotations

import io
from pathlib import Path

from dulwich import porcelain
from dulwich.repo import Repo

AUTHOR = b"Test Author <test@example.com>"


class GitRepo:
    """A non-bare repository on branch main that tests commit manifests to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.repo = Repo.init(str(path), default_branch=b"main")

    @property
    def url(self) -> str:
        """The repository as a local path (what a source's repo_url names)."""
        return str(self.path)

    def commit(self, files: dict[str, str | None], message: str = "change") -> str:
        """Write (or, for None, delete) ``files`` and commit them; return the commit id."""
        removed = []
        for name, text in files.items():
            target = self.path / name
            if text is None:
                if target.exists():
                    removed.append(name)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        if removed:
            porcelain.remove(self.repo, paths=[str(self.path / n) for n in removed])
        added = [str(self.path / n) for n, t in files.items() if t is not None]
        if added:
            porcelain.add(self.repo, paths=added)
        sha = porcelain.commit(self.repo, message=message.encode(), author=AUTHOR, committer=AUTHOR)
        return sha.decode() if isinstance(sha, bytes) else str(sha)

    def tag(self, name: str) -> None:
        """An annotated tag on HEAD."""
        porcelain.tag_create(
            self.repo, name.encode(), author=AUTHOR, message=b"release", annotated=True
        )

    def branch(self, name: str) -> None:
        """A branch at HEAD."""
        porcelain.branch_create(self.repo, name)

    def log(self) -> str:
        """``git log`` output, for failure messages."""
        out = io.StringIO()
        porcelain.log(self.repo, outstream=out)
        return out.getvalue()
