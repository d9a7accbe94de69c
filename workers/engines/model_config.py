"""Read a Hugging Face ``config.json`` and decide whether pdcluster can hand its KV over.

Pure Python (no torch, no mlx): the scheduler and both engines share it.

The KV handoff contract covers models whose cache is plain per-layer K/V:
full attention, or a sliding window per layer (``ModelSpec.windows``; a
sliding layer ships only its last ``window`` tokens). Attention sinks
(gpt-oss) are learned weights, not cache, so they need nothing. A windowed
architecture is supported only where transformers and mlx-lm both implement
the same window on the same layers, since a handoff runs one engine's cache
through the other's model. Everything else is refused with an error that
names the architecture and the reason, until it is handled and tested:

* a sliding window one of the two libraries ignores (gemma2, mistral or
  qwen2 with ``sliding_window`` set, sliding ``layer_types`` on other arches);
* MLA (a compressed latent instead of per-head K/V);
* linear attention or SSM state (a recurrent state instead of K/V).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# model_type values whose cache is plain per-layer K/V, tested in both engines.
SUPPORTED_ARCHES: frozenset[str] = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gpt_oss", "gemma3_text"}
)
# Of those, the ones whose sliding layers both libraries implement (the others
# must have every layer full): model_type -> the per-layer windows of a config.
WINDOWED_ARCHES: frozenset[str] = frozenset({"gpt_oss", "gemma3_text"})

_SLIDING = "has sliding-window attention layers, whose cache is a rotating window rather than the whole prefix"
_GEMMA2 = ("has sliding-window attention layers that mlx-lm 0.32's gemma2 does not implement (it attends "
           "over the whole prefix in every layer, transformers slides every other layer), so the engines "
           "would disagree")
_MULTIMODAL = "is a multimodal checkpoint; serve its text-only model (model_type gemma3_text)"
_MLA = "caches MLA latents (compressed joint K/V), not per-head keys and values"
_STATE = "keeps linear-attention or SSM state, which is not a per-layer K/V cache"

_UNPROVEN = ("has plain per-layer K/V, but pdcluster has no tiny checkpoint of it (pdc make-model) and so no "
             "test proving its handoff token-identical across engines; it is refused until there is one")

# Known architectures outside the contract, with the reason.
REFUSED_ARCHES: dict[str, str] = {
    "mixtral": _UNPROVEN,
    "gemma2": _GEMMA2,
    "gemma3n": _SLIDING,
    "gemma4": _SLIDING,
    "gemma4_text": _SLIDING,
    "cohere2": _SLIDING,
    "exaone4": _SLIDING,
    "deepseek_v2": _MLA,
    "deepseek_v3": _MLA,
    "deepseek_v32": _MLA,
    "kimi_k2": _MLA,
    "minicpm3": _MLA,
    "glm4_moe_lite": _MLA,
    "mamba": _STATE,
    "mamba2": _STATE,
    "jamba": _STATE,
    "falcon_h1": _STATE,
    "nemotron_h": _STATE,
    "granitemoehybrid": _STATE,
    "qwen3_next": _STATE,
    "qwen3_5": _STATE,
    "qwen3_5_moe": _STATE,
    "recurrent_gemma": _STATE,
    "rwkv7": _STATE,
    "lfm2": _STATE,
    "lfm2_moe": _STATE,
    "kimi_linear": _STATE,
    "bailing_moe_linear": _STATE,
    "minimax": _STATE,
}
# Checked on the top-level config (the others on the text config).
_REFUSED_WRAPPERS: dict[str, str] = {"gemma3": _MULTIMODAL}

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


class UnsupportedModelError(ValueError):
    """The model exists but its cache is outside the KV handoff contract."""


class ModelFolderError(ValueError):
    """The model folder is missing a file pdcluster needs."""


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of pdcluster needs to know about a checkpoint."""

    model_type: str
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    dtype: str  # checkpoint compute dtype: float32 | float16 | bfloat16
    eos_token_ids: tuple[int, ...]
    windows: tuple[int, ...] = ()  # per layer: 0 full attention, w > 0 a sliding window; () all full

    def kv_bytes_per_token(self, dtype: str | None = None) -> int:
        """K plus V bytes for one token over all layers."""
        itemsize = 4 if (dtype or self.dtype) == "float32" else 2
        return 2 * self.num_layers * self.kv_heads * self.head_dim * itemsize


def load_config(model_dir: str | Path) -> dict:
    """Parse ``config.json`` in ``model_dir`` with a clear error if it is absent."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelFolderError(f"{model_dir}: no config.json; is this a Hugging Face model folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path}: not valid JSON ({e})") from None


def check_supported(config: dict) -> None:
    """Raise ``UnsupportedModelError`` unless the cache is plain per-layer K/V
    (full, or sliding windows both engines implement alike)."""
    top = config.get("model_type")
    if top in _REFUSED_WRAPPERS:
        raise UnsupportedModelError(f"architecture {top!r} is not supported: it {_REFUSED_WRAPPERS[top]}")
    cfg = _text_config(config)
    arch = cfg.get("model_type") or "<missing model_type>"
    if arch in REFUSED_ARCHES:
        raise UnsupportedModelError(f"architecture {arch!r} is not supported: it {REFUSED_ARCHES[arch]}")
    if arch not in SUPPORTED_ARCHES:
        raise UnsupportedModelError(
            f"architecture {arch!r} is unknown to pdcluster; supported: {', '.join(sorted(SUPPORTED_ARCHES))}"
        )
    if arch in WINDOWED_ARCHES:
        layer_windows(cfg)  # raises where the two libraries would slide different layers
    elif _uses_sliding_window(cfg):
        raise UnsupportedModelError(
            f"architecture {arch!r} with sliding_window={cfg.get('sliding_window')} is not supported: "
            f"it {_SLIDING}, which mlx-lm 0.32's {arch} ignores (full attention) while transformers "
            "applies it, so the engines would disagree"
        )
    if cfg.get("kv_lora_rank") or cfg.get("q_lora_rank"):
        raise UnsupportedModelError(f"architecture {arch!r} is not supported: it {_MLA}")


def layer_windows(cfg: dict) -> tuple[int, ...]:
    """Each layer's sliding window in tokens (0: full attention) as both
    libraries build the model from the text config ``cfg``; () when every
    layer is full. Both count a window alike: the token at position ``i``
    attends to positions ``(i - window, i]``, itself included.

    * gpt_oss: ``layer_types`` (default: sliding, full, alternating), window
      ``sliding_window`` (default 128), in transformers and mlx-lm alike.
    * gemma3_text: mlx-lm 0.32 reads only ``sliding_window_pattern`` (every
      ``pattern``-th layer is global, default 6); transformers reads
      ``layer_types`` when given, else the same pattern. A config whose two
      disagree is refused."""
    arch = cfg.get("model_type")
    num_layers = int(cfg["num_hidden_layers"])
    if arch == "gpt_oss":
        window = int(cfg.get("sliding_window") or 128)
        types = cfg.get("layer_types") or [("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)]
    elif arch == "gemma3_text":
        window = int(cfg.get("sliding_window") or 512)
        pattern = int(cfg.get("sliding_window_pattern") or 6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
        if cfg.get("layer_types") and list(cfg["layer_types"]) != types:
            raise UnsupportedModelError(
                f"architecture {arch!r} with layer_types {cfg['layer_types']} is not supported: mlx-lm 0.32 "
                f"reads only sliding_window_pattern={pattern} ({types}), so the engines would slide "
                "different layers")
        if pattern > num_layers:
            raise UnsupportedModelError(
                f"architecture {arch!r} with sliding_window_pattern={pattern} > {num_layers} layers is not "
                "supported: mlx-lm 0.32's gemma3_text needs a global layer at index pattern - 1")
    else:
        return ()
    if len(types) != num_layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise UnsupportedModelError(f"architecture {arch!r} has layer_types {types}; expected one "
                                    f"'sliding_attention' or 'full_attention' per layer ({num_layers})")
    windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    return windows if any(windows) else ()


def read_model_spec(model_dir: str | Path) -> ModelSpec:
    """Load, check and summarise a model folder's config."""
    config = load_config(model_dir)
    check_supported(config)
    return spec_from_config(config)


def spec_from_config(config: dict) -> ModelSpec:
    """Summarise an already checked config dict."""
    cfg = _text_config(config)
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return ModelSpec(
        model_type=cfg["model_type"],
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        hidden_size=hidden,
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        dtype=_DTYPES.get(dtype, "float32"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        windows=layer_windows(cfg),
    )


def check_tokenizer(model_dir: str | Path) -> Path:
    """Return the tokenizer file, or raise ``ModelFolderError`` naming what is missing."""
    folder = Path(model_dir)
    for name in ("tokenizer.json", "tokenizer.model"):
        if (folder / name).is_file():
            return folder / name
    raise ModelFolderError(
        f"{model_dir}: no tokenizer (expected tokenizer.json or tokenizer.model); "
        "pdcluster needs the tokenizer beside the weights"
    )


def _text_config(config: dict) -> dict:
    # Multimodal checkpoints nest the language model's config.
    return config.get("text_config") or config


def _uses_sliding_window(cfg: dict) -> bool:
    layer_types = cfg.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        return True
    if cfg.get("use_sliding_window") is False:
        return False
    return cfg.get("sliding_window") not in (None, 0)


def _eos_ids(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(value),)


def resolve_model(model: str | Path) -> Path:
    """A local model folder for ``model``: the folder itself, or a hub id
    downloaded into the Hugging Face cache (needs network and ``huggingface_hub``)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise ModelFolderError(f"{model}: no such model folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelFolderError(f"{model}: not a local folder, and huggingface_hub is not installed to fetch it") from None
    try:
        return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:  # offline, unknown repo, gated repo ...
        raise ModelFolderError(f"{model}: not a local folder, and fetching it from the hub failed: {e}") from None
