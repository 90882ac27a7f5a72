"""The embedding model: its tokenizer for sizing chunks, its weights for vectors.

The tokenizer is light (the ``tokenizers`` library, no torch) and is what
chunking and token budgets use. The weights load on the first ``encode``,
once per process and model directory, so a server reports SERVING long
before the model is in memory and tests share one loaded model. Models load
from a local directory only: the Hugging Face libraries are told to stay
offline, so nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from tokenizers import Tokenizer

Vectors = npt.NDArray[np.float32]

_MODELS: dict[Path, Any] = {}
_LOCK = threading.Lock()


def load_model(path: Path) -> Any:
    """The SentenceTransformer in ``path``, loaded once per process (thread-safe)."""
    path = path.resolve()
    model = _MODELS.get(path)
    if model is not None:
        return model
    with _LOCK:
        model = _MODELS.get(path)
        if model is None:
            # Set before the import: huggingface_hub reads them at import time.
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
            model.eval()
            _MODELS[path] = model
    return model


def model_loaded(path: Path) -> bool:
    """Whether ``path``'s weights are in memory already."""
    return path.resolve() in _MODELS


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Embedder:
    """One sentence-transformers model, by name and local directory."""

    def __init__(self, name: str, path: Path, batch_size: int = 64) -> None:
        self.name = name
        self.path = path
        self.batch_size = batch_size

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The model's fast tokenizer, without the padding and truncation it ships with."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        tok.no_truncation()
        tok.no_padding()
        return tok

    @cached_property
    def special_tokens(self) -> int:
        """Tokens the model adds around every text ([CLS] and [SEP] for BERT)."""
        return len(self.tokenizer.encode("", add_special_tokens=True).ids)

    @cached_property
    def window(self) -> int:
        """Content tokens the model reads (its max_seq_length less special tokens)."""
        cfg = _read_json(self.path / "sentence_bert_config.json")
        seq = int(cfg.get("max_seq_length") or 256)
        return seq - self.special_tokens

    @cached_property
    def dimensions(self) -> int:
        """The dimension of the vectors, read from the model's config (no weights loaded)."""
        dim = 0
        modules = json.loads((self.path / "modules.json").read_text())
        for module in modules:
            cfg = _read_json(self.path / module.get("path", "") / "config.json")
            kind = str(module.get("type", ""))
            if kind.endswith("Pooling"):
                dim = int(cfg.get("word_embedding_dimension", dim))
            elif kind.endswith("Dense"):
                dim = int(cfg.get("out_features", dim))
        if dim <= 0:
            dim = int(self._model().get_embedding_dimension())
        return dim

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the model's tokens over ``text`` (no special tokens)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).offsets)

    def count(self, text: str) -> int:
        """The number of model tokens in ``text`` (no special tokens)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def load(self) -> None:
        """Load the model's weights now (blocking: call it from a worker thread)."""
        self._model()

    def _model(self) -> Any:
        return load_model(self.path)

    def encode(self, texts: Sequence[str]) -> Vectors:
        """L2-normalised float32 vectors, one row per text, encoded in batches.

        Blocking and CPU-bound: call it from a worker thread.
        """
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        vectors = self._model().encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
