"""Peak memory of one run: CUDA's allocator peak, or on the CPU the process's peak resident set.

On Linux the CPU peak (``VmHWM``) can be reset (``/proc/self/clear_refs``), so each run in one
process (``gradleak compare`` runs several) gets its own peak; where it cannot be reset, the
process's lifetime peak is returned and :func:`reset_peak_memory` says so.
"""

from __future__ import annotations

import resource

import torch


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device | str) -> str:
    """Start a new peak; returns its scope: ``"run"`` (reset) or ``"process"`` (could not reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "run"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        return "run"
    except OSError:
        return "process"


def peak_memory_mb(device: torch.device | str) -> float:
    """MiB: CUDA max allocated since the last reset, or the peak RSS (``VmHWM``, else ``ru_maxrss``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_memory_mb(device: torch.device | str) -> float:
    """MiB in use now: CUDA allocated, or the resident set."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    rss = _status_mb("VmRSS")
    return rss if rss is not None else float("nan")


__all__ = ["current_memory_mb", "peak_memory_mb", "reset_peak_memory"]
