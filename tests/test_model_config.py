"""Model folders pdcluster cannot serve are refused with errors that say why."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from workers.engines.model_config import (
    ModelFolderError,
    UnsupportedModelError,
    check_tokenizer,
    read_model_spec,
    resolve_model,
)


def _write_config(folder: Path, **config: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=2, vocab_size=128, max_position_embeddings=512)
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    return folder


@pytest.mark.parametrize(
    "model_type, reason",
    [
        ("gemma2", "sliding-window"),
        ("gemma3_text", "sliding-window"),
        ("gpt_oss", "attention sinks"),
        ("deepseek_v3", "MLA"),
        ("mamba", "SSM"),
        ("qwen3_next", "linear-attention"),
    ],
)
def test_out_of_contract_architecture_is_refused_naming_arch_and_reason(tmp_path: Path, model_type: str, reason: str) -> None:
    folder = _write_config(tmp_path / model_type, model_type=model_type)
    with pytest.raises(UnsupportedModelError) as err:
        read_model_spec(folder)
    assert model_type in str(err.value)
    assert reason in str(err.value)


def test_sliding_window_on_a_supported_arch_is_refused(tmp_path: Path) -> None:
    folder = _write_config(tmp_path / "m", model_type="mistral", sliding_window=4096)
    with pytest.raises(UnsupportedModelError, match="mistral.*sliding_window=4096"):
        read_model_spec(folder)


def test_sliding_layer_types_are_refused(tmp_path: Path) -> None:
    folder = _write_config(tmp_path / "m", model_type="qwen3", layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(UnsupportedModelError, match="qwen3"):
        read_model_spec(folder)


def test_disabled_sliding_window_is_accepted(tmp_path: Path) -> None:
    folder = _write_config(tmp_path / "m", model_type="qwen2", sliding_window=4096, use_sliding_window=False)
    assert read_model_spec(folder).model_type == "qwen2"


def test_unknown_architecture_is_refused_listing_supported_ones(tmp_path: Path) -> None:
    folder = _write_config(tmp_path / "m", model_type="frobnicator")
    with pytest.raises(UnsupportedModelError, match="'frobnicator' is unknown.*llama"):
        read_model_spec(folder)


def test_folder_without_config_gives_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="no config.json"):
        read_model_spec(tmp_path)


def test_folder_without_tokenizer_gives_clear_error(make_tiny_model, tmp_path: Path) -> None:
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(make_tiny_model("llama"), folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFolderError, match="no tokenizer"):
        check_tokenizer(folder)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="no such model folder"):
        resolve_model(tmp_path / "absent")


def test_spec_reads_gqa_and_head_dim(make_tiny_model) -> None:
    spec = read_model_spec(make_tiny_model("qwen3"))
    assert (spec.num_layers, spec.kv_heads, spec.head_dim) == (4, 2, 16)
    assert spec.kv_bytes_per_token() == 2 * 4 * 2 * 16 * 4
