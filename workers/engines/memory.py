"""How much host memory is free: the figure engines report when their KV lives in host RAM.

Linux gives its available pages directly. macOS has no ``SC_AVPHYS_PAGES``;
there (unified memory, where MLX allocates) the figure is free + inactive +
speculative pages from ``vm_stat``. Imports neither torch nor mlx, so every
engine can use it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

VM_STAT_TIMEOUT_S = 2.0


def host_free_bytes() -> int:
    """Bytes of host memory free for new allocations, or 0 where the platform does not say."""
    if sys.platform == "darwin":
        return _darwin_free_bytes()
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def parse_vm_stat(text: str) -> int:
    """Bytes free, inactive or speculative in macOS ``vm_stat`` output (0 if unreadable)."""
    page = re.search(r"page size of (\d+) bytes", text)
    if page is None:
        return 0
    pages = 0
    for name in ("Pages free", "Pages inactive", "Pages speculative"):
        found = re.search(rf"^{name}:\s+(\d+)\.", text, re.MULTILINE)
        pages += int(found.group(1)) if found else 0
    return pages * int(page.group(1))


def _darwin_free_bytes() -> int:
    try:
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=VM_STAT_TIMEOUT_S,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return parse_vm_stat(out)
