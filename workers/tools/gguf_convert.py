"""Convert a llama-architecture GGUF file into a Hugging Face folder both engines load.

transformers reads GGUF (``from_pretrained(folder, gguf_file=...)``, with the
``gguf`` package) and dequantizes every tensor to float32, undoing llama.cpp's
query/key permutation on the way. It refuses to ``save_pretrained`` such a
model, so this module writes the folder itself:

* ``model.safetensors``: the float32 state dict (a tied ``lm_head`` is left out,
  as transformers itself saves it);
* ``config.json``: transformers' config, with the rope base under both
  spellings. transformers 5 writes ``rope_parameters: {rope_theta: ...}`` and
  mlx-lm 0.32 reads a top-level ``rope_theta``; without it mlx-lm silently uses
  10000 and produces fluent nonsense;
* ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja``
  from the GGUF's own tokenizer and template;
* ``generation_config.json`` with the tokenizer's end-of-turn token as EOS.

This is the one module outside ``workers/engines/torch_engine.py`` that imports
torch and transformers: converting runs once per machine, on the torch extra.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Step = Callable[[str], None]  # called with the name of each step as it starts


class ConversionError(RuntimeError):
    """A GGUF that cannot be converted here; the message says why and what to install."""


def convert_gguf(gguf_file: Path, out_dir: Path, *, on_step: Step = lambda _: None) -> None:
    """Write ``out_dir`` (which must exist and be empty) from ``gguf_file``."""
    torch, transformers, save_file = _import_torch_stack()
    on_step("read and dequantize the GGUF")
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as e:  # transformers asks for gguf (and accelerate) only when it reads a GGUF
        raise ConversionError(f"reading {gguf_file.name} needs the gguf and accelerate packages ({e}); "
                              "install them with: pip install 'pdcluster[torch]'") from None
    on_step("write the weights")
    state = {key: tensor.contiguous() for key, tensor in model.state_dict().items()
             if not (key == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    on_step("write the tokenizer and chat template")
    tokenizer.save_pretrained(str(out_dir))
    if not tokenizer.chat_template:
        raise ConversionError(f"{gguf_file.name} carries no chat template")
    on_step("write the config")
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    _write_json(out_dir / "config.json", hf_config(model.config.to_dict(), type(model).__name__, eos_id))
    _write_json(out_dir / "generation_config.json",
                {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos_id})


def hf_config(config: dict[str, Any], architecture: str, eos_token_id: int) -> dict[str, Any]:
    """transformers' config dict as both engines read it: an architecture name,
    the end-of-turn EOS, and the rope base both nested and top-level."""
    # the weights are plain float32 now (no GGUF quantization left), and the
    # source path is this machine's business
    dropped = ("transformers_version", "quantization_config", "_name_or_path", "_model_name_or_path")
    config = {key: value for key, value in config.items() if key not in dropped}
    config["architectures"] = [architecture]
    config["eos_token_id"] = eos_token_id
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ConversionError("the GGUF's config has no rope base (rope_theta)")
    config["rope_theta"] = float(theta)  # mlx-lm 0.32 reads only this spelling
    config["rope_parameters"] = {**rope, "rope_theta": float(theta), "rope_type": rope.get("rope_type", "default")}
    return config


def _import_torch_stack() -> tuple[Any, Any, Any]:
    try:
        import torch
        import transformers
        from safetensors.torch import save_file
    except ImportError as e:
        raise ConversionError(f"converting the built-in model needs torch and transformers ({e}); "
                              "install them with: pip install 'pdcluster[torch]'") from None
    return torch, transformers, save_file


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
