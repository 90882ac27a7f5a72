"""The web console at ``/console`` and the REST reference at ``/docs``.

Both are static files of the committed bundle ``gateway/console/dist``, built
from ``gateway/console/src`` and the pinned npm packages by ``./dev gen`` (so
serving them needs no Node.js) and drift-checked by ``./dev test``. ``/docs``
is Swagger UI from ``swagger-ui-dist``, reading ``/openapi.json``. Nothing
is fetched from a CDN, and every page is served under a Content-Security-
Policy that allows only the gateway's own scripts, styles and API.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

#: Where the bundle is; next to this module so an installed package carries it.
DIST = Path(__file__).resolve().parent / "console" / "dist"

#: Only the bundle's own files and calls back to this gateway; no inline
#: script or style, no eval, no framing, no form posts elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; manifest-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",  # LICENSE, NOTICE
}


@dataclass(frozen=True, slots=True)
class Asset:
    """One file of the bundle, ready to send."""

    body: bytes
    content_type: str
    etag: str

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The response headers: type, CSP, revalidation by ETag, no sniffing or referrer."""
        return [
            (b"content-type", self.content_type.encode()),
            (b"content-security-policy", CSP.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"),
            # File names carry no content hash, so clients revalidate every time (cheap: 304).
            (b"cache-control", b"no-cache"),
            (b"etag", self.etag.encode()),
        ]


class WebUI:
    """The bundle's files by request path, read once at first use."""

    def __init__(self, root: Path = DIST) -> None:
        self.root = root
        self._assets: dict[str, Asset] | None = None

    @staticmethod
    def serves(path: str) -> bool:
        """Whether ``path`` is the console's or the docs' (the API is everything else)."""
        return path in ("/docs", "/console") or path.startswith("/console/")

    def _load(self) -> dict[str, Asset]:
        assets: dict[str, Asset] = {}
        if self.root.is_dir():
            for file in sorted(self.root.rglob("*")):
                if not file.is_file():
                    continue
                body = file.read_bytes()
                kind = _TYPES.get(file.suffix, "application/octet-stream")
                etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
                assets["/console/" + file.relative_to(self.root).as_posix()] = Asset(
                    body, kind, etag
                )
        index = assets.get("/console/index.html")
        if index is not None:
            assets["/console"] = assets["/console/"] = index
        docs = assets.get("/console/docs.html")
        if docs is not None:
            assets["/docs"] = docs
        return assets

    def find(self, path: str) -> Asset | None:
        """The file for ``path``, or None (unknown path, or no bundle built)."""
        if self._assets is None:
            self._assets = self._load()
        return self._assets.get(path)
