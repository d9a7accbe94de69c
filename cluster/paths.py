"""Where pdcluster keeps its files on a node."""
from __future__ import annotations

import os
from pathlib import Path

TINY_MODEL_ARCH = "llama"
TINY_MODEL_SEED = 0


def cache_dir() -> Path:
    """``$PDC_HOME`` if set, else ``$XDG_CACHE_HOME/pdcluster`` or ``~/.cache/pdcluster``."""
    if os.environ.get("PDC_HOME"):
        return Path(os.environ["PDC_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pdcluster"


def tiny_model_dir() -> Path:
    """The built-in tiny model, made on first use and reused after."""
    from workers.tools.modelgen import make_model

    folder = cache_dir() / "models" / f"tiny-{TINY_MODEL_ARCH}-seed{TINY_MODEL_SEED}"
    if not (folder / "model.safetensors").is_file():
        make_model(folder, TINY_MODEL_ARCH, seed=TINY_MODEL_SEED, preset="tiny")
    return folder
