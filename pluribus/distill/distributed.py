"""Training in several processes (``accelerate launch`` / ``torchrun``, DDP on gloo or NCCL): who this process is,
the launch check, and the rule that rank 0 alone writes.

A step of N processes with ``batch_size`` b each sees the examples one process sees with ``grad_accum`` N x b:
Trainer's sampler hands micro-batch ``N k + r`` of the epoch's order to rank r. SFT and RL normalize the loss over
the whole step either way; the PRM averages micro-batch means, as gradient accumulation does.
"""

from __future__ import annotations

import os
from typing import Any

from pluribus.errors import PluribusError

# The launch variables each multi-process launcher sets in its workers: torchrun (and accelerate's DDP, FSDP and
# DeepSpeed launchers, which run it), MPI.
_WORLD_VARS = ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def world_size() -> int:
    """How many training processes this launch has (1 without a launcher)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 without a launcher)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes outputs, records and the summary: rank 0."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (nothing to wait for in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def unwrap(model: Any) -> Any:
    """The model inside a distributed wrapper (DDP's ``.module``), or the model itself."""
    while type(model).__name__ in {"DistributedDataParallel", "DataParallel"} and hasattr(model, "module"):
        model = model.module
    return model


def check_launch() -> None:
    """Refuse a launch that asked for several processes and started one.

    ``accelerate launch --num_processes N`` on a machine without a GPU (and ``--cpu``) runs its simple launcher:
    one process, whatever N says, with only MASTER_ADDR/MASTER_PORT left behind. Training on would quietly use a
    global batch N times smaller than asked.
    """
    by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ
    if by_accelerate and "MASTER_ADDR" in os.environ and not any(v in os.environ for v in _WORLD_VARS):
        raise PluribusError(
            "accelerate launch asked for several processes but started only this one (without a GPU, and with "
            "--cpu, its default launcher runs a single process whatever --num_processes says); launch N processes "
            "with `accelerate launch --multi_gpu --num_processes N -m pluribus.cli train ...` (on CPU they train "
            "on gloo) or `torchrun --nproc_per_node N -m pluribus.cli train ...`, or drop --num_processes")


def check_engine(accelerator: Any) -> None:
    """Refuse a training whose accelerate config asks for FSDP or DeepSpeed when accelerate set up something
    else: on a machine without a GPU accelerate runs an FSDP config as plain data parallelism (MULTI_CPU), with
    every weight on every process, and says nothing."""
    for engine, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED")):
        got = str(accelerator.distributed_type).rsplit(".", 1)[-1]
        if os.environ.get(var, "false").lower() == "true" and got != engine:
            raise PluribusError(
                f"the accelerate config asks for {engine}, but accelerate set this training up as {got} (it "
                f"applies {engine} on GPUs and other accelerators, not on CPU processes); on CPU launch plain data "
                "parallelism (`accelerate launch --multi_gpu --num_processes N -m pluribus.cli train ...`), or run "
                f"the {engine} config on GPUs")
