"""Dispatch between the Triton kernels and their PyTorch twins: `kernels: auto | triton | torch | off`.

- ``off``: nothing is patched; the model runs as the library wrote it.
- ``torch``: the fused paths run on their PyTorch twins (any device, any float dtype).
- ``triton``: the Triton kernels; an input they cannot take is an error (``PluribusError``), never a silent switch.
- ``auto``: Triton where it can run (CUDA, compute capability 8.0+, triton installed, or ``TRITON_INTERPRET=1`` with
  CPU tensors), the twin elsewhere; each reason for taking the twin is logged once.

Inputs that are wrong for every backend (mismatched shapes, rank 0) always raise ``PluribusError``.
Nothing here imports triton: it is an optional extra and is only looked for when a kernel is about to run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable
from functools import lru_cache
from typing import Literal

import torch

from pluribus.errors import PluribusError

logger = logging.getLogger("pluribus.kernels")

Mode = Literal["auto", "triton", "torch", "off"]
KernelImpl = Literal["triton", "torch"]
MODES: tuple[str, ...] = ("auto", "triton", "torch", "off")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_logged: set[str] = set()


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is a known kernels mode, else raise a one-line PluribusError."""
    if mode not in MODES:
        raise PluribusError(f"Unknown kernels mode '{mode}'. Available: {', '.join(MODES)}.")
    return mode


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (read at call time, not import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=1)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@lru_cache(maxsize=16)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_reason(device: torch.device) -> str | None:
    """Why Triton cannot run on ``device`` (None when it can)."""
    if not triton_installed():
        return "triton is not installed (pip install 'pluribus[kernels]')"
    if device.type == "cpu":
        return None if interpreter_enabled() else "tensors are on the CPU (Triton needs CUDA or TRITON_INTERPRET=1)"
    if device.type != "cuda":
        return f"tensors are on '{device.type}' (Triton kernels need CUDA)"
    if interpreter_enabled():
        return "TRITON_INTERPRET=1 runs kernels on the CPU only, and the tensors are on CUDA"
    major, minor = _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())
    if major < 8:
        return f"GPU compute capability {major}.{minor} is below 8.0"
    return None


def tensor_reason(tensors: Iterable[torch.Tensor | None], dtype: torch.dtype) -> str | None:
    """Why these tensors cannot go to a Triton kernel computing in ``dtype`` (None when they can)."""
    live = [t for t in tensors if t is not None]
    if not live:
        return None
    reason = device_reason(live[0].device)
    if reason:
        return reason
    if dtype not in TRITON_DTYPES:
        return f"dtype {dtype} is not supported by the Triton kernels (float16, bfloat16, float32)"
    if any(t.device != live[0].device for t in live):
        return "the tensors are on different devices"
    if any(not t.is_contiguous() for t in live):
        return "an input is not contiguous"
    return None


def choose_backend(mode: str, reason: str | None, op: str) -> KernelImpl:
    """Pick the backend for one call of ``op``: ``reason`` says why Triton cannot take it (None: it can)."""
    if mode == "torch":
        return "torch"
    if mode == "triton":
        if reason:
            raise PluribusError(
                f"kernels: triton cannot run {op}: {reason}; use kernels: auto (falls back to PyTorch) or torch"
            )
        return "triton"
    if mode == "auto":
        if reason:
            key = f"{op}: {reason}"
            if key not in _logged:  # once per reason, not once per layer per step
                _logged.add(key)
                logger.info("kernels auto: %s runs on its PyTorch twin because %s", op, reason)
            return "torch"
        return "triton"
    check_mode(mode)
    raise PluribusError(f"kernels: off means no fused path; {op} was called with mode 'off'")


def check_lora_shapes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_a: torch.Tensor, lora_b: torch.Tensor, name: str = "lora_linear") -> None:
    """Raise PluribusError unless ``x (..., K)``, ``W (N, K)``, ``bias (N,)``, ``A (r, K)``, ``B (N, r)`` fit, r >= 1."""
    if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise PluribusError(
            f"{name}: W, A and B must be 2-D, got W {tuple(weight.shape)}, A {tuple(lora_a.shape)}, "
            f"B {tuple(lora_b.shape)}"
        )
    n, k = weight.shape
    r = lora_a.shape[0]
    if r == 0 or lora_b.shape[1] == 0:
        raise PluribusError(f"{name}: LoRA rank is 0 (A {tuple(lora_a.shape)}); use a rank of at least 1")
    if x.dim() < 1 or x.shape[-1] != k:
        raise PluribusError(f"{name}: input last dim {tuple(x.shape)[-1:]} does not match W {tuple(weight.shape)}")
    if lora_a.shape[1] != k or lora_b.shape != (n, r):
        raise PluribusError(
            f"{name}: LoRA shapes do not fit W {tuple(weight.shape)}: expected A ({r}, {k}) and B ({n}, {r}), "
            f"got A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)}"
        )
    if bias is not None and bias.shape != (n,):
        raise PluribusError(f"{name}: bias {tuple(bias.shape)} does not match W {tuple(weight.shape)}")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise PluribusError(f"{name}: inputs must be floating point, got x {x.dtype} and W {weight.dtype}")
