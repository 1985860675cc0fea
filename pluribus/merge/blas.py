"""The Gram products of the adapter merge in NumPy's BLAS (syrk), its thread pool capped at one while a merge runs."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pluribus.merge import methods as M


@functools.cache
def _numpy_blas() -> Any:
    """threadpoolctl's handle on NumPy's BLAS (found once: the scan of loaded libraries costs milliseconds)."""
    import numpy  # noqa: F401 (its BLAS must be loaded for the controller to find it)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def numpy_gram(x: torch.Tensor) -> torch.Tensor:
    """``x @ x.T`` of a float64 CPU matrix in NumPy, which hands a product of a matrix with its own transpose to BLAS
    syrk: one triangle, half a GEMM's flops (torch has no syrk; measured 0.7x the time on the merge bench's modules).
    """
    if x.device.type != "cpu" or x.requires_grad:
        return M.gram(x)
    a = x.numpy()
    return torch.from_numpy(a @ a.T)


@contextlib.contextmanager
def capped_gram() -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Yield the Gram product to pass to ``methods.truncate_factors``: :func:`numpy_gram`, with NumPy's BLAS capped at
    one thread while the block runs.

    Its thread pool is separate from torch's OpenMP team and the two spin on each other's cores: at its default (all
    cores) beside two merge workers the merge bench ran 2.2x slower, beside one 2-thread torch worker 25x slower.
    Gram products of R x d factors are small enough that one thread each is right. A BLAS that threadpoolctl cannot
    see cannot be capped: then it yields torch's product (``methods.gram``).
    """
    blas = _numpy_blas()
    if not blas.lib_controllers:
        yield M.gram
        return
    with blas.limit(limits=1):
        yield numpy_gram
