"""Triton kernels for the LoRA / attention hot path, each with a PyTorch twin, and their dispatch.

For the trainer: ``patch_model(model, mode) -> PatchHandle`` (``mode`` is the recipe's ``kernels``:
auto | triton | torch | off) and ``chunked_lm_head_loss(...)``. Importing this package never imports triton:
the Triton kernels live in ``triton_kernels/`` and are imported when a Triton launcher first runs.
"""

from pluribus.kernels.dispatch import MODES
from pluribus.kernels.lm_head_loss import chunked_lm_head_loss
from pluribus.kernels.lora_linear import Projection, lora_linear, projections
from pluribus.kernels.patching import PatchHandle, patch_model
from pluribus.kernels.rope import rope_

__all__ = ["MODES", "PatchHandle", "Projection", "chunked_lm_head_loss", "lora_linear", "patch_model",
           "projections", "rope_"]
