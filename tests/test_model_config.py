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
    layer_windows,
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
        ("cohere2", "sliding-window"),
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


# ---------------------------------------------------------------- sliding windows


def test_gpt_oss_alternates_sliding_and_full_layers_and_its_sinks_need_nothing(tmp_path: Path) -> None:
    folder = _write_config(tmp_path / "m", model_type="gpt_oss", num_hidden_layers=4, sliding_window=128)
    assert read_model_spec(folder).windows == (128, 0, 128, 0)  # transformers' and mlx-lm's default layer_types


def test_gpt_oss_layer_types_choose_the_sliding_layers(tmp_path: Path) -> None:
    types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    folder = _write_config(tmp_path / "m", model_type="gpt_oss", num_hidden_layers=4, sliding_window=64,
                           layer_types=types)
    assert read_model_spec(folder).windows == (0, 64, 64, 0)


def test_gemma3_text_slides_five_layers_of_six(tmp_path: Path) -> None:
    folder = _write_config(tmp_path / "m", model_type="gemma3_text", num_hidden_layers=12, sliding_window=512,
                           sliding_window_pattern=6)
    assert read_model_spec(folder).windows == (512,) * 5 + (0,) + (512,) * 5 + (0,)


def test_gemma3_layer_types_that_mlx_lm_would_not_follow_are_refused(tmp_path: Path) -> None:
    types = ["sliding_attention", "full_attention"] * 3  # mlx-lm 0.32 reads only sliding_window_pattern
    folder = _write_config(tmp_path / "m", model_type="gemma3_text", num_hidden_layers=6, sliding_window=512,
                           sliding_window_pattern=6, layer_types=types)
    with pytest.raises(UnsupportedModelError, match="gemma3_text.*sliding_window_pattern=6"):
        read_model_spec(folder)


def test_multimodal_gemma3_is_refused_pointing_at_its_text_model(tmp_path: Path) -> None:
    folder = _write_config(tmp_path / "m", model_type="gemma3",
                           text_config={"model_type": "gemma3_text", "num_hidden_layers": 6})
    with pytest.raises(UnsupportedModelError, match="'gemma3'.*multimodal.*gemma3_text"):
        read_model_spec(folder)


def test_gemma2_is_refused_because_mlx_lm_does_not_slide_it(tmp_path: Path) -> None:
    folder = _write_config(tmp_path / "m", model_type="gemma2")
    with pytest.raises(UnsupportedModelError, match="gemma2.*sliding-window.*mlx-lm.*whole prefix"):
        read_model_spec(folder)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_a_live_window_that_mlx_lm_ignores_is_refused_saying_so(tmp_path: Path, model_type: str) -> None:
    folder = _write_config(tmp_path / "m", model_type=model_type, sliding_window=4096, use_sliding_window=True)
    with pytest.raises(UnsupportedModelError, match=f"{model_type}.*sliding_window=4096.*mlx-lm 0.32's "
                                                    f"{model_type} ignores"):
        read_model_spec(folder)


def test_full_attention_models_report_no_windows(make_tiny_model) -> None:
    assert read_model_spec(make_tiny_model("llama")).windows == ()
    assert layer_windows({"model_type": "qwen3", "num_hidden_layers": 2}) == ()
