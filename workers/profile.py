"""Quick start-up measurement of a node's compute and memory bandwidth.

Placement needs rough numbers, not a benchmark suite: a dense matmul in the
engine's compute dtype for TFLOPS, and a large copy for memory bandwidth, each
within a small time budget. Declared values (``--tflops``, ``--mem-bw-gbps``)
override these. Runs on the engine's own thread (MLX streams are per thread).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from workers.engine import Engine

BUDGET_S = 0.3  # per measurement


@dataclass(frozen=True)
class MeasuredProfile:
    tflops: float
    mem_bw_gbps: float


def measure_profile(engine: Engine, budget_s: float = BUDGET_S) -> MeasuredProfile:
    """Matmul TFLOPS and copy bandwidth on ``engine``'s device and dtype."""
    if engine.name == "torch":
        return _measure_torch(engine.device, engine.layout_dtype, budget_s)
    if engine.name == "mlx":
        return _measure_mlx(engine.layout_dtype, budget_s)
    raise ValueError(f"cannot profile engine {engine.name!r}")


def _repeat(run_once, sync, budget_s: float) -> tuple[int, float]:
    """Run ``run_once`` until ``budget_s`` has passed (at least twice); return (runs, seconds)."""
    run_once()
    sync()  # warm-up
    runs, started = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - started < budget_s:
        run_once()
        runs += 1
    sync()
    return runs, time.perf_counter() - started


def _measure_torch(device: str, dtype: str, budget_s: float) -> MeasuredProfile:
    import torch

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elif device == "mps":
            torch.mps.synchronize()

    runs, seconds = _repeat(lambda: torch.matmul(a, b), sync, budget_s)
    tflops = 2 * n**3 * runs / seconds / 1e12
    src = torch.empty(64 << 20 if device == "cpu" else 512 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    runs, seconds = _repeat(lambda: dst.copy_(src), sync, budget_s)
    return MeasuredProfile(tflops=tflops, mem_bw_gbps=2 * src.numel() * runs / seconds / 1e9)


def _measure_mlx(dtype: str, budget_s: float) -> MeasuredProfile:
    import mlx.core as mx

    mx_dtype = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]
    n = 2048 if mx.default_device() == mx.gpu else 256  # mlx[cpu] matmuls are slow; keep start-up quick
    a = mx.random.normal((n, n)).astype(mx_dtype)
    b = mx.random.normal((n, n)).astype(mx_dtype)
    mx.eval(a, b)
    runs, seconds = _repeat(lambda: mx.eval(a @ b), lambda: None, budget_s)
    tflops = 2 * n**3 * runs / seconds / 1e12
    src = mx.zeros((64 << 20 if mx.default_device() == mx.gpu else 16 << 20,), dtype=mx.uint8)
    mx.eval(src)
    runs, seconds = _repeat(lambda: mx.eval(src + 1), lambda: None, budget_s)
    return MeasuredProfile(tflops=tflops, mem_bw_gbps=2 * src.size * runs / seconds / 1e9)
