"""MXFP4 (OCP microscaling FP4) as gpt-oss checkpoints store their MoE experts.

The real gpt-oss checkpoints keep every expert matrix as MXFP4: blocks of 32
values along the input dimension share one power-of-two scale (E8M0: a byte
holding the exponent + 127), each value an FP4 E2M1 code (a sign and one of
0, 0.5, 1, 1.5, 2, 3, 4, 6), two codes to a byte, the even element in the low
nibble. transformers names them ``{gate_up,down}_proj_blocks``
``[experts, out, in / 32, 16]`` (uint8) and ``..._scales`` ``[experts, out,
in / 32]`` (uint8), against the float parameters' ``[experts, in, out]``, and
marks the config with ``quantization_config = {"quant_method": "mxfp4"}``.
``pdc make-model --arch gpt_oss --mxfp4`` writes its experts this way
(``quantize``); transformers dequantizes them on load where it has no MXFP4
kernels (the CPU), mlx-lm computes with them as they are, and both must
agree token for token (tests/test_mxfp4.py).
"""
from __future__ import annotations

import numpy as np

GROUP = 32  # values per shared scale
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)  # magnitudes of codes 0..7
E2M1_MAX_EXP = 2  # the largest E2M1 value, 6, is 1.5 x 2^2
SCALE_BIAS = 127
QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    # what stays in float, as in the released checkpoints
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
}


def quantize(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float expert parameter ``[experts, in, out]`` as MXFP4 ``(blocks [experts, out, in / 32, 16],
    scales [experts, out, in / 32])``, both uint8. Each group's scale is 2^(floor(log2(max|x|)) - 2)
    (the OCP rule: the largest value lands in [4, 8)), each value rounds to the nearest E2M1 code
    (ties to the even code) and saturates at 6. ``ValueError`` unless ``in`` is a multiple of 32
    and every value is finite."""
    if weight.ndim != 3 or weight.shape[1] % GROUP:
        raise ValueError(f"MXFP4 needs [experts, in, out] with in a multiple of {GROUP}, got {weight.shape}")
    x = np.asarray(weight, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("MXFP4 cannot hold NaN or infinity")
    experts, width, out = x.shape
    groups = x.transpose(0, 2, 1).reshape(experts, out, width // GROUP, GROUP)  # [E, out, G, 32]
    amax = np.abs(groups).max(axis=-1)
    _, power = np.frexp(amax)  # amax = m x 2^power, m in [0.5, 1): floor(log2(amax)) = power - 1, exactly
    exponent = np.where(amax > 0, power - 1 - E2M1_MAX_EXP, -SCALE_BIAS)
    exponent = np.clip(exponent, -SCALE_BIAS, SCALE_BIAS).astype(np.int32)
    scaled = groups / np.ldexp(np.float32(1.0), exponent)[..., None]
    magnitude = np.abs(scaled)
    # nearest code: the midpoints between neighbours decide; a tie goes to the even code
    codes = np.searchsorted((E2M1[1:] + E2M1[:-1]) / 2, magnitude, side="left")
    ties = np.isin(magnitude, (E2M1[1:] + E2M1[:-1]) / 2) & (codes % 2 == 1)
    codes = np.where(ties, codes + 1, codes)
    codes = np.minimum(codes, 7).astype(np.uint8) | np.where(np.signbit(scaled), 8, 0).astype(np.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # [E, out, G, 16]
    return blocks, (exponent + SCALE_BIAS).astype(np.uint8)


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``quantize``'s inverse, ``[experts, in, out]`` float32: what transformers loads the blocks as."""
    lut = np.concatenate([E2M1, -E2M1])
    codes = np.empty((*blocks.shape[:-1], blocks.shape[-1] * 2), dtype=np.uint8)
    codes[..., 0::2], codes[..., 1::2] = blocks & 0x0F, blocks >> 4
    values = np.ldexp(lut[codes], scales.astype(np.int32)[..., None] - SCALE_BIAS)  # [E, out, G, 32]
    experts, out = blocks.shape[:2]
    return values.reshape(experts, out, -1).transpose(0, 2, 1).astype(np.float32)
