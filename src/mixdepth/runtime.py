"""Where and how the library runs: device, dtype and autocast, per-block compile, RNG state, allocator.

Device and dtype names are the same everywhere (`TrainConfig`, every command): a device is
`auto` (cuda if available, else cpu), `cpu`, `cuda` or `cuda:N`; a dtype is `auto` (bf16 on CUDA,
fp32 on CPU), `fp32` or `bf16`. Compilation is applied from outside the model, one block at a
time (torchtitan), so the model object stays the same for saving and evaluation.
"""

from __future__ import annotations

import contextlib
import ctypes
import random
from typing import Any

import numpy as np
import torch

from .config import DTYPES


def resolve_device(name: str) -> torch.device:
    """`auto` (cuda if available, else cpu) or a torch device name (cpu, cuda, cuda:1, ...).

    Raises a one-line `ValueError` for an unknown name or a CUDA device without CUDA.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} asked for, but CUDA is not available")
    return dev


def _use_bf16(name: str, device: torch.device) -> bool:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return name == "bf16" or (name == "auto" and device.type == "cuda")


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of `fp32`, `bf16` or `auto` (bf16 on CUDA, fp32 on CPU)."""
    return torch.bfloat16 if _use_bf16(name, device) else torch.float32


def autocast_ctx(device: torch.device, dtype: str):
    """bf16 autocast on CUDA (default there), plain fp32 on CPU (default there)."""
    if _use_bf16(dtype, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_blocks(model) -> None:
    """torch.compile each block in place (torchtitan style): static shapes in topk mode, so one graph
    per block; the model object stays the same for saving and evaluation."""
    for layer in model.layers:
        layer.compile()


def seed_everything(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators (model init and the random router read them)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state(sampler: np.random.Generator) -> dict[str, Any]:
    """Every random state a training step reads, as JSON-able lists."""
    py = random.getstate()
    npg = np.random.get_state()
    st = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [npg[0], npg[1].tolist(), npg[2], npg[3], npg[4]],
        "python": [py[0], list(py[1]), py[2]],
        "sampler": sampler.bit_generator.state,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict[str, Any], sampler: np.random.Generator) -> None:
    """Restore what `rng_state` captured (the CUDA states only where CUDA is available)."""
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = st["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    sampler.bit_generator.state = st["sampler"]
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])


def steady_allocator() -> None:
    """Keep freed memory in glibc's heap instead of returning it to the OS after every step.

    Otherwise every large activation is a fresh mmap whose pages fault in on first touch, a cost
    that falls unevenly on models whose tensors differ in size and adds run-to-run noise.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: its largest allowed value
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
