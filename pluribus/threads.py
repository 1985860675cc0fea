"""CPU threads of torch, one setting for every stage: the recipe's ``threads`` or the CLI's ``--threads``.

Why a default of 1 on a machine without a GPU: torch starts one OpenMP thread per core, and OpenMP threads
spin while they wait for each other. When other jobs share the cores (a shared 2-core box measured 2 tok/s
with torch's default against 42-58 tok/s with one thread) each spinning thread steals the core another one
needs and generation collapses; the small batched matmuls of a 135M-class model gain little from more
threads when the machine is idle. On a dedicated CPU machine set ``threads`` to the cores you can spare.
With CUDA the GPU does the heavy work and torch's own default is kept. An ``OMP_NUM_THREADS`` the user
exported is respected: torch already reads it.
"""

from __future__ import annotations

import contextlib
import os

DEFAULT_CPU_THREADS = 1


def resolve_threads(threads: int | None) -> int | None:
    """The thread count a stage uses: ``threads`` if set, else $OMP_NUM_THREADS if set, else 1 without
    CUDA; None means "keep torch's default" (a GPU machine)."""
    if threads is not None:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    import torch

    return None if torch.cuda.is_available() else DEFAULT_CPU_THREADS


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (and inter-op ones, while torch still allows it) before a stage's heavy
    work; returns the intra-op count in effect."""
    import torch

    n = resolve_threads(threads)
    if n is None:
        return torch.get_num_threads()
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        # torch fixes the inter-op pool once any parallel work has run (or it was set once); the intra-op
        # count is what matters for generation and training
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(n)
    return torch.get_num_threads()
