"""Process-level settings: device choice and the memory allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys

import torch

from neurallm.errors import NlmError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise NlmError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device):
    """bf16 autocast where asked (or 'auto' on CUDA); None means plain fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@functools.cache
def cpu_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX512-BF16 or AMX); without them its fused
    RNN cannot take bf16 inputs ("could not create a primitive descriptor")."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of returning it to the OS.

    The output layer of a word-level model makes tensors of tens of MB each step
    (batch * bptt * vocab floats). glibc serves blocks that size with mmap and unmaps
    them on free, so every step pays to fault in and zero fresh pages. Serving them
    from the heap and never trimming it made a PTB training step about 1.3x faster
    here. Only glibc has mallopt; elsewhere this does nothing.
    """
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError, TypeError):
        return False


def release_free_memory() -> bool:
    """Give the pages of freed heap memory back to the OS (glibc's malloc_trim; elsewhere nothing).

    A long-lived small block (a server session's state) allocated among a step's temporaries
    keeps the heap around it from shrinking: here 1,000 kept states held ~55 MB of freed memory
    in the process's resident size until trimmed, ~10 KB each after.
    """
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0))
    except (OSError, AttributeError, TypeError):
        return False


def peak_rss_mb() -> float:
    """The process's peak resident memory so far. Linux's VmHWM where there is one: getrusage's
    ru_maxrss also counts a parent's peak from before this program was started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 1024)  # macOS reports bytes, Linux KiB
