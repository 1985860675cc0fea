"""LoRA extraction: a fully fine-tuned expert -> a PEFT LoRA adapter by a per-module truncated SVD of its delta.

For each adapted linear weight, ``delta = W_tuned - W_base ~= B A`` with ``B = U_k S_k^1/2``, ``A = S_k^1/2 V_k^T``,
k fixed or the smallest rank keeping an energy fraction per module (so experts and modules get different ranks,
as in FlexMoRE). The relative Frobenius error is reported per module and in total; deltas outside the adapted
modules (embeddings, norms) cannot be carried by a LoRA and are reported as ``uncaptured``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pluribus.errors import OutputExistsError, PluribusError
from pluribus.io import atomic_dir
from pluribus.merge import methods as M
from pluribus.merge.adapters import AdapterMerge, save_adapter
from pluribus.merge.checkpoint import Checkpoint

#: 2-D weights never turned into LoRA modules by default (PEFT adapts linear layers).
SKIP = r"(embed_tokens|lm_head|wte|wpe|embed_in|embed_out)"


def extract_lora(
    base: str | Path,
    tuned: str | Path,
    folder: Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    skip: str = SKIP,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Write the LoRA adapter approximating ``tuned - base`` into ``folder`` (atomically); returns the report.

    ``device`` (``pluribus.device``; None: the CPU): where each delta and its SVD are computed.

    Exactly one of ``rank`` / ``energy``. Raises PluribusError for mismatched models, NaN/Inf or an existing
    ``folder`` (unless ``overwrite``).
    """
    if Path(folder).exists() and not overwrite:
        raise OutputExistsError(folder)
    if (rank is None) == (energy is None):
        raise PluribusError("extraction needs exactly one of rank (e.g. 16) or energy (e.g. 0.9)")
    if energy is not None:
        M.check_fraction(energy, "energy")
    b_ck, t_ck = Checkpoint(base), Checkpoint(tuned)
    if set(b_ck.tensors) != set(t_ck.tensors):
        odd = sorted(set(b_ck.tensors) ^ set(t_ck.tensors))[0]
        raise PluribusError(f"'{base}' and '{tuned}' have different tensors (e.g. {odd}); extract from the tuned model's own base")
    # each tensor's delta: a linear weight's goes into the adapter (truncated SVD), any other is left out and counted
    merged = AdapterMerge(modules={})
    uncaptured = 0.0
    names = list(b_ck.tensors)
    for k, name in enumerate(names):
        uncaptured += _extract_tensor(merged, name, b_ck, t_ck, base, tuned, rank=rank, energy=energy, skip=skip,
                                      device=device)
        if progress:
            progress(k + 1, len(names), name)
    b_ck.close()
    t_ck.close()
    if not merged.modules:
        raise PluribusError(f"'{tuned}' does not differ from '{base}' in any linear weight; nothing to extract")
    report = _report(merged, uncaptured, device)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        # an absolute path (or the hub id / alias as given): a relative name means nothing from another folder
        recorded = str(Path(base).expanduser().resolve()) if Path(base).expanduser().exists() else str(base)
        save_adapter(tmp, merged, {"base_model_name_or_path": recorded, "task_type": "CAUSAL_LM"})
        (tmp / "extract_report.json").write_text(json.dumps(report, indent=2))
    return report


def _extract_tensor(merged: AdapterMerge, name: str, b_ck: Checkpoint, t_ck: Checkpoint, base: str | Path,
                    tuned: str | Path, *, rank: int | None, energy: float | None, skip: str,
                    device: torch.device | None) -> float:
    """Add tensor ``name``'s delta ``tuned - base`` to ``merged`` as a low-rank module where it is an adaptable
    linear weight that changed; returns the squared norm of the delta the adapter does not carry (0 where it
    does). A changed integer tensor, a shape mismatch or NaN/Inf is an error."""
    bi, ti = b_ck.tensors[name], t_ck.tensors[name]
    if bi.shape != ti.shape:
        raise PluribusError(f"tensor {name} is {bi.shape} in '{base}' but {ti.shape} in '{tuned}'")
    if not bi.dtype.is_floating_point:
        if not torch.equal(b_ck.get(name), t_ck.get(name)):
            raise PluribusError(f"tensor {name} ({bi.dtype}) differs between '{base}' and '{tuned}'; a LoRA cannot "
                                "carry an integer tensor, and extraction will not drop it")
        return 0.0
    b, t = b_ck.get(name), t_ck.get(name)
    M.check_finite(b, f"{base}:{name}")
    M.check_finite(t, f"{tuned}:{name}")
    delta = t.to(device=device, dtype=torch.float32) - b.to(device=device, dtype=torch.float32)
    adaptable = len(bi.shape) == 2 and name.endswith(".weight") and not re.search(skip, name)
    if not (adaptable and bool(delta.any())):
        return float(delta.double().pow(2).sum())
    low = M.truncate_dense(delta, rank=rank, energy=energy)
    module = name.removesuffix(".weight")
    merged.modules[module] = (low.A.float().cpu().contiguous(), low.B.float().cpu().contiguous())
    merged.errors[module], merged.norms[module] = low.error, low.exact_norm
    return 0.0


def _report(merged: AdapterMerge, uncaptured: float, device: torch.device | None) -> dict[str, Any]:
    """extract_report.json: the modules' ranks and errors, and the share of the delta's norm left out of the
    adapter (``uncaptured``: the squared norm of the tensors it does not carry)."""
    captured = sum(n**2 for n in merged.norms.values())
    ranks = merged.ranks
    return {
        "modules": len(ranks),
        "rank_min": min(ranks.values()),
        "rank_max": max(ranks.values()),
        "error": merged.total_error,
        "uncaptured": math.sqrt(uncaptured / (captured + uncaptured)) if captured + uncaptured else 0.0,
        "errors": merged.errors,
        "ranks": ranks,
        "ran_on": {"device": str(device or "cpu"), "dtype": "float32 (SVD in float64)"},
    }
