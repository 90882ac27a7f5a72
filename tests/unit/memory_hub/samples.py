"""Small inputs the memory-hub tests share: a real PDF built by hand, and the tokenizer."""

from __future__ import annotations

from functools import cache

from autoecoops.kernel.memory_hub.embedder import Embedder
from autoecoops.kernel.memory_hub.settings import DEFAULT_MODEL, MemoryHubSettings


def make_pdf(*pages: str, title: str = "") -> bytes:
    """A minimal valid PDF whose pages show ``pages`` as text (Helvetica)."""
    objects: list[bytes] = []
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    info = f"<< /Title ({title}) >>".encode() if title else b"<< >>"
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        lines = " ".join(
            f"({line.replace('(', '[').replace(')', ']')}) Tj 0 -14 Td" for line in text.split("\n")
        )
        stream = f"BT /F1 12 Tf 72 720 Td {lines} ET".encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.append(info)
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info {len(objects)} 0 R >>\n"
        f"startxref\n{xref}\n%%EOF\n"
    ).encode()
    return bytes(out)


@cache
def embedder() -> Embedder:
    """The packaged model's embedder; unit tests use only its tokenizer."""
    settings = MemoryHubSettings()
    return Embedder(DEFAULT_MODEL, settings.models[DEFAULT_MODEL])
