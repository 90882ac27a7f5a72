"""memory-hub settings: defaults, overrides and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoecoops.kernel.memory_hub.settings import DEFAULT_MODEL, MemoryHubSettings
from autoecoops.kernel.mesh.errors import ConfigError

P = "AUTOECOOPS_MEMORY_HUB_"


def test_defaults_use_the_packaged_model() -> None:
    s = MemoryHubSettings.from_env({})
    assert s.default_model == DEFAULT_MODEL
    path = s.model_path(DEFAULT_MODEL)
    assert path is not None and (path / "model.safetensors").is_file()
    assert (s.dense_weight, s.lexical_weight) == (0.5, 0.5)


def test_overrides() -> None:
    s = MemoryHubSettings.from_env(
        {
            f"{P}MAX_K": "50",
            f"{P}DENSE_WEIGHT": "70",
            f"{P}LEXICAL_WEIGHT": "30",
            f"{P}HNSW_THRESHOLD": "0",
        }
    )
    assert s.max_k == 50 and s.hnsw_threshold == 0
    assert (s.dense_weight, s.lexical_weight) == pytest.approx((0.7, 0.3))


def test_extra_models_must_be_model_directories(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a sentence-transformers model"):
        MemoryHubSettings.from_env({f"{P}MODELS": f"mine={tmp_path}"})
    (tmp_path / "modules.json").write_text("[]")
    s = MemoryHubSettings.from_env({f"{P}MODELS": f"mine={tmp_path}", f"{P}MODEL": "mine"})
    assert s.default_model == "mine" and s.model_path("mine") == tmp_path


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({f"{P}MODEL": "gpt-17"}, "not a known model"),
        ({f"{P}CHUNK_TOKENS": "64", f"{P}CHUNK_OVERLAP_TOKENS": "64"}, "less than the chunk size"),
        ({f"{P}DENSE_WEIGHT": "0", f"{P}LEXICAL_WEIGHT": "0"}, "one must be above 0"),
        ({f"{P}MODELS": "nonsense"}, "NAME=/path"),
        ({f"{P}MAX_K": "0"}, "between 1 and"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        MemoryHubSettings.from_env(env)
    assert P in str(info.value)
