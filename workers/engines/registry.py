"""Every engine pdcluster can run, in one dict.

``ENGINES`` maps an engine's name (what ``pdc worker --engine`` takes and
what a node advertises) to an ``EngineSpec``: how to load it, which library
must import for it to be available, and which library it wraps (the native
baseline ``pdc bench decode`` compares against). Everything else (the worker,
the CLI, the check-handoff and bench tools) asks this module; nothing else
names an engine.

Importing this module imports neither torch nor mlx: each loader imports its
engine's module when called.

Adding an engine: write ``workers/engines/<name>_engine.py`` (the ``Engine``
protocol of ``workers/engines/base.py``), then add a loader and an entry here.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workers.engines.base import Engine

# (model folder, compute dtype or None for the checkpoint's, device or None for the best) -> Engine
Loader = Callable[[Path, "str | None", "str | None"], Engine]


@dataclass(frozen=True)
class EngineSpec:
    """One engine: its name, how to load it and what it needs."""

    name: str  # the ENGINES key; also Engine.name of what ``load`` returns
    requires: str  # a module that imports exactly when the engine can run here ("torch", "mlx.core")
    library: str  # the model library it wraps; a distribution name ("transformers", "mlx-lm")
    native_entry: str  # the library's own generate, as `pdc bench decode` reports it
    loader: Loader  # imports the engine's module only when called

    def load(self, model_dir: str | Path, dtype: str | None = None, device: str | None = None) -> Engine:
        """Build this engine for ``model_dir`` (imports its library now)."""
        return self.loader(Path(model_dir), dtype, device)


def _load_torch(model_dir: Path, dtype: str | None, device: str | None) -> Engine:
    from workers.engines.torch_engine import TorchEngine

    return TorchEngine(model_dir, device=device, dtype=dtype)


def _load_mlx(model_dir: Path, dtype: str | None, device: str | None) -> Engine:
    from workers.engines.mlx_engine import MLXEngine

    return MLXEngine(model_dir, dtype=dtype)  # MLX picks its own device (the GPU on Apple silicon)


ENGINES: dict[str, EngineSpec] = {
    "torch": EngineSpec("torch", requires="torch", library="transformers",
                        native_entry="generate(do_sample=False)", loader=_load_torch),
    "mlx": EngineSpec("mlx", requires="mlx.core", library="mlx-lm", native_entry="generate_step",
                      loader=_load_mlx),
}

# The defaults of the commands and configs that pair a prefill engine with a decode engine
# (check-handoff, up, demo). `pdc up` and `pdc demo` decode on the first engine of
# DECODE_PREFERENCE that imports here (the last if none does).
DEFAULT_PREFILL_ENGINE = "torch"
DECODE_PREFERENCE: tuple[str, ...] = ("mlx", "torch")
DEFAULT_DECODE_ENGINE = DECODE_PREFERENCE[0]


def engine_names() -> tuple[str, ...]:
    """Every engine's name, in ``ENGINES`` order."""
    return tuple(ENGINES)


def engine_spec(name: str) -> EngineSpec:
    """The spec of engine ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(ENGINES)}") from None


def check_engine(name: str, what: str = "engine") -> str:
    """``name`` if it is a known engine; ``ValueError`` naming ``what`` and the known names otherwise."""
    if name not in ENGINES:
        raise ValueError(f"{what} must be one of {', '.join(ENGINES)}, got {name!r}")
    return name


def load_engine(name: str, model_dir: str | Path, dtype: str | None = None, device: str | None = None) -> Engine:
    """Build engine ``name`` for ``model_dir``; imports only that engine's library."""
    return engine_spec(name).load(model_dir, dtype, device)


def is_available(name: str) -> bool:
    """Whether engine ``name``'s library imports here (imports it to find out)."""
    try:
        importlib.import_module(engine_spec(name).requires)
    except ImportError:
        return False
    return True


def available_engines(names: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Those of ``names`` (default: all) whose library imports here, in the order given."""
    return tuple(name for name in (engine_names() if names is None else names) if is_available(name))


def default_decode_engine() -> str:
    """The decode engine when none is named: the first available of ``DECODE_PREFERENCE``."""
    return next((name for name in DECODE_PREFERENCE if is_available(name)), DECODE_PREFERENCE[-1])


def describe_engines() -> str:
    """``torch (transformers) or mlx (mlx-lm)``: the engines and their libraries, for help texts."""
    names = [f"{spec.name} ({spec.library})" for spec in ENGINES.values()]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
