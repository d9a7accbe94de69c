"""gpt-oss in its released expert format: MXFP4 blocks and scales.

``workers/tools/mxfp4.py`` writes them (``pdc make-model --arch gpt_oss --mxfp4``),
transformers dequantizes them on load (no MXFP4 kernels on a CPU), mlx-lm computes
with them as they are; the handoff must stay token-identical in every direction,
on a prompt longer than the sliding window.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_torch_and_mlx

from cluster.cli import main
from workers.tools import mxfp4
from workers.tools.modelgen import PRESETS

WINDOW = PRESETS["tiny"]["sliding_window"]


# ---------------------------------------------------------------- the format


def test_quantized_experts_dequantize_as_transformers_reads_them() -> None:
    torch = pytest.importorskip("torch")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    weight = (np.random.default_rng(0).standard_normal((4, 64, 96)) * 0.1).astype(np.float32)  # [E, in, out]
    blocks, scales = mxfp4.quantize(weight)
    assert blocks.shape == (4, 96, 2, 16) and scales.shape == (4, 96, 2)
    assert blocks.dtype == scales.dtype == np.uint8
    theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    assert np.array_equal(mxfp4.dequantize(blocks, scales), theirs.numpy())
    assert np.abs(mxfp4.dequantize(blocks, scales) - weight).max() <= 0.25 * np.abs(weight).max()
    again = mxfp4.quantize(mxfp4.dequantize(blocks, scales))  # MXFP4 values are a fixed point
    assert np.array_equal(again[0], blocks) and np.array_equal(again[1], scales)


def _one_group(values: list[float]) -> np.ndarray:
    """32 values (the rest zero) as one [1, 32, 1] parameter, quantized and read back."""
    group = np.zeros((1, 32, 1), dtype=np.float32)
    group[0, : len(values), 0] = values
    return mxfp4.dequantize(*mxfp4.quantize(group))[0, : len(values), 0]


def test_scales_put_the_largest_value_in_4_to_8_and_values_round_to_nearest_even_code() -> None:
    assert list(_one_group([6.0, 0.5, -1.5, 0.25])) == [6.0, 0.5, -1.5, 0.0]  # scale 1; 0.25 ties to 0
    assert list(_one_group([7.0, 2.5, 0.75, 5.0])) == [6.0, 2.0, 1.0, 4.0]  # 7 saturates; 2.5 -> 2, 0.75 -> 1, 5 -> 4
    assert list(_one_group([12.0, 1.0])) == [12.0, 1.0]  # scale 2
    assert list(_one_group([0.0])) == [0.0]  # an all-zero group
    assert list(_one_group([-0.0, 3e-3, 1e-3])) == pytest.approx([0.0, 3e-3, 1e-3], rel=0.35)


@pytest.mark.parametrize(("weight", "needle"), [
    (np.zeros((2, 48, 8), dtype=np.float32), "multiple of 32"),
    (np.zeros((32, 8), dtype=np.float32), "experts, in, out"),
    (np.full((1, 32, 1), np.nan, dtype=np.float32), "NaN"),
])
def test_what_mxfp4_cannot_hold_is_refused(weight: np.ndarray, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        mxfp4.quantize(weight)


def test_make_model_writes_the_released_layout_and_refuses_other_archs(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from safetensors.numpy import load_file

    folder = tmp_path / "oss"
    assert main(["make-model", str(folder), "--arch", "gpt_oss", "--mxfp4"]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    weights = load_file(str(folder / "model.safetensors"))
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in weights)
    blocks = weights["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    hidden, inter, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    assert blocks.shape == (experts, 2 * inter, hidden // 32, 16) and blocks.dtype == np.uint8
    assert weights["model.layers.0.mlp.experts.down_proj_scales"].shape == (experts, hidden, inter // 32)
    assert weights["model.layers.0.mlp.experts.gate_up_proj_bias"].dtype == np.float32  # biases stay float
    assert json.loads((folder / "pdcluster-model.json").read_text())["experts"] == "mxfp4"
    assert main(["make-model", str(tmp_path / "l"), "--arch", "llama", "--mxfp4"]) == 2
    assert main(["make-model", str(tmp_path / "q"), "--arch", "gpt_oss", "--mxfp4", "--quantize", "8"]) == 2
    assert "--mxfp4 is gpt-oss's expert format" in capsys.readouterr().err


# ---------------------------------------------------------------- both engines, every direction


@pytest.fixture(scope="module")
def oss_mxfp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mxfp4") / "tiny-gpt-oss-mxfp4"
    assert main(["make-model", str(folder), "--arch", "gpt_oss", "--mxfp4"]) == 0
    return folder


@requires_torch_and_mlx
def test_each_engine_runs_the_experts_it_was_given(oss_mxfp4: Path) -> None:
    """mlx-lm keeps the experts in MXFP4 (its quantized switch layers); transformers holds exactly
    their dequantized values."""
    from safetensors.numpy import load_file

    from workers.engines.registry import load_engine

    mlx = load_engine("mlx", oss_mxfp4, "float32")
    kinds = {(type(m).__name__, getattr(m, "mode", None)) for n, m in mlx.model.named_modules()
             if n.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj"))}
    assert kinds == {("QuantizedSwitchLinear", "mxfp4")}
    torch_engine = load_engine("torch", oss_mxfp4, "float32")
    weights = load_file(str(oss_mxfp4 / "model.safetensors"))
    prefix = "model.layers.0.mlp.experts.gate_up_proj"
    loaded = torch_engine.model.model.layers[0].mlp.experts.gate_up_proj.detach().float().numpy()
    assert np.array_equal(loaded, mxfp4.dequantize(weights[prefix + "_blocks"], weights[prefix + "_scales"]))


@requires_torch_and_mlx
@pytest.mark.parametrize("direction", [("torch", "mlx"), ("mlx", "torch"), ("torch", "torch"), ("mlx", "mlx")],
                         ids=lambda d: f"{d[0]}-to-{d[1]}")
def test_an_mxfp4_gpt_oss_hands_off_token_identically(oss_mxfp4: Path, direction: tuple[str, str]) -> None:
    from workers.tools.handoff import HandoffConfig, check_handoff

    result = check_handoff(HandoffConfig(model=str(oss_mxfp4), prefill_engine=direction[0],
                                         decode_engine=direction[1], prompt_tokens=WINDOW + 44, max_tokens=16))
    assert result.identical, (result.first_mismatch, result.handoff_tokens, result.reference_tokens)


def test_a_quantized_decode_copy_of_an_mxfp4_checkpoint_is_refused(oss_mxfp4: Path, tmp_path: Path) -> None:
    """mlx-lm's affine copy is made from float weights; MXFP4 experts are quantized already."""
    pytest.importorskip("mlx.core")
    from workers.tools import quantize

    assert quantize.quantization_of(oss_mxfp4) == {"quant_method": "mxfp4"}
    with pytest.raises(ValueError, match="already quantized"):
        quantize.quantize_checkpoint(oss_mxfp4, tmp_path / "copy", 8)
    assert not (tmp_path / "copy").exists()
