"""Where pdcluster keeps its files on a node."""
from __future__ import annotations

import os
from pathlib import Path

def cache_dir() -> Path:
    """``$PDC_HOME`` if set, else ``$XDG_CACHE_HOME/pdcluster`` or ``~/.cache/pdcluster``."""
    if os.environ.get("PDC_HOME"):
        return Path(os.environ["PDC_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pdcluster"
