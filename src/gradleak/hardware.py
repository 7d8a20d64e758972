"""What the machine can do: native bfloat16, and the measured matrix-product peak.

A bfloat16 matrix product is fast only where the processor has bf16 instructions (x86 AVX512-BF16
or AMX, ARM BF16, CUDA from compute capability 8.0). Elsewhere PyTorch emulates it, and on a CPU
it then runs at a fraction of the float32 speed (measured 56 against 194 GFLOP/s on a 2-core AVX-512
Xeon without AVX512-BF16). :func:`native_bf16` reads the capability; :func:`matmul_gflops` measures
the throughput itself, which is also the peak that ``gradleak bench step`` compares a step against.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch

_X86_BF16 = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def native_bf16(device: str | torch.device = "cpu") -> bool | None:
    """Whether ``device`` computes bfloat16 natively: True, False, or None when it cannot be told.

    CUDA asks the driver; a Linux CPU reads its flags (``avx512_bf16``/``amx_bf16`` on x86, ``bf16``
    on ARM); other systems answer None (measure with :func:`matmul_gflops`).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if dev.type != "cpu":
        return None
    flags = cpu_flags()
    if not flags:
        return None
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return any(f in flags for f in _X86_BF16)


def matmul_gflops(dtype: torch.dtype = torch.float32, *, size: int = 1024, seconds: float = 0.5,
                  device: str | torch.device = "cpu") -> float:
    """Measured throughput of a square matrix product, in GFLOP/s (2·size³ per product), on the
    current thread count: the best of several timed windows of about ``seconds`` / 4 each."""
    dev = torch.device(device)
    a = torch.randn(size, size, device=dev).to(dtype)
    b = torch.randn(size, size, device=dev).to(dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        t0 = time.perf_counter()
        count = 0
        while count < 2 or time.perf_counter() - t0 < seconds / 4:
            a @ b
            count += 1
            sync()
        best = min(best, (time.perf_counter() - t0) / count)
    return 2 * size**3 / best / 1e9


def precision_warning(precision: str, device: str | torch.device) -> str | None:
    """A warning when ``precision="bf16"`` would run emulated (and so slower than float32), else None."""
    if precision != "bf16":
        return None
    native = native_bf16(device)
    if native is False:
        return (f"precision=bf16 on a {torch.device(device).type.upper()} without native bfloat16 "
                f"instructions: it runs emulated, slower than fp32 (it still saves memory); "
                f"use precision=fp32 for speed")
    return None


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def device_memory(device: str | torch.device) -> tuple[int, int] | None:
    """``(free, total)`` bytes of a CUDA device (``torch.cuda.mem_get_info``); None on a CPU.

    A CPU's run is checked against the machine's memory elsewhere (:func:`memory_bytes`); on a GPU
    the allocator's free memory is what a run can still take.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(dev)
    return int(free), int(total)


@contextlib.contextmanager
def counting_saved_bytes() -> Iterator[list[int]]:
    """Count the bytes autograd saves for the backward inside the block (``saved_tensors_hooks``).

    Yields a one-element list that holds the running total. A tensor saved by several operations
    counts each time, so the total errs high, as a memory estimate should.
    """
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


@contextlib.contextmanager
def float32_policy(device: str | torch.device, *, tf32: bool = False,
                   deterministic: bool = False) -> Iterator[dict[str, bool | None]]:
    """Float32 that is float32 on a GPU: TF32 off for CUDA matrix products and convolutions (or on, if asked).

    PyTorch lets cuDNN convolutions use TF32 by default (10-bit mantissa on Ampere and later), so a
    CUDA run would not compute the float32 it records. Inside the block both switches are set to
    ``tf32`` and restored after.

    ``deterministic=True`` also makes a CUDA run repeat itself bit for bit on the same GPU, driver
    and versions: ``torch.use_deterministic_algorithms(True)`` (an operation without a deterministic
    CUDA kernel then raises instead of running), cuDNN's deterministic algorithms without autotuning,
    and cuBLAS's fixed workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8`` where unset; cuBLAS reads it
    when it starts, so set it yourself before anything touches the GPU if the process already has).
    A CPU run is deterministic already (same machine, same threads), so on a CPU nothing changes.

    Yields what the run records: ``{"tf32": tf32, "deterministic": deterministic}`` on CUDA, both
    None elsewhere.
    """
    if torch.device(device).type != "cuda":
        yield {"tf32": None, "deterministic": None}
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.use_deterministic_algorithms(True)
    try:
        yield {"tf32": tf32, "deterministic": deterministic}
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic,
         torch.backends.cudnn.benchmark) = saved[:4]
        torch.use_deterministic_algorithms(saved[4])
        if saved[5] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
