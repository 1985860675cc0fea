"""Merge PEFT LoRA adapters of one base directly in low-rank space, never loading the base model's weights.

Each adapter t contributes ``delta_t(m) = s_t(m) B_t(m) A_t(m)`` to module m, with ``s = alpha / r`` (or
``alpha / sqrt(r)`` under rsLoRA; ``rank_pattern`` / ``alpha_pattern`` per module). A module an adapter lacks
counts as zero. The weighted sum ``lambda sum_t w_t delta_t(m) = B_cat A_cat`` is exact with
``B_cat = [c_1 B_1 | ... | c_T B_T]`` and ``A_cat = [A_1; ...; A_T]`` (``c_t = lambda w_t s_t``):
  * ``cat`` writes exactly that (rank sum r_t);
  * ``svd`` its best rank-k approximation from the factors (methods.truncate_factors), or per module the
    smallest rank keeping an energy fraction (written as ``rank_pattern``);
  * ``ties`` / ``dare_*`` / ``magnitude`` / ``pcb`` act on each module's dense delta (the only basis-independent
    choice: low-rank factors are defined up to an invertible r x r map), then compress back to rank k.
Output adapters have scaling 1 (``lora_alpha = r`` per module) so the stored factors are the delta itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pluribus.errors import PluribusError
from pluribus.merge import methods as M
from pluribus.merge.config import MergeSpec
from pluribus.models import read_adapter_config

PREFIX = "base_model.model."
Tensor = torch.Tensor


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``delta = scaling * B @ A`` with A [r, d_in], B [d_out, r]."""

    A: Tensor
    B: Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scaling


@dataclass
class Adapter:
    """A loaded PEFT LoRA adapter: its folder, its config and its modules by name (``model.layers.0...q_proj``)."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]

    @property
    def base(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT's own rule (peft.utils.other.get_pattern_key): a key matches a module name suffix as a regex
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(path: str | Path) -> Adapter:
    """Read a PEFT LoRA folder; raises PluribusError for missing/corrupt files, unsupported types and NaN/Inf."""
    path = Path(path)
    st_path = path / "adapter_model.safetensors"
    config = read_adapter_config(path)  # a JSON object whose fields have the types read below
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise PluribusError(f"adapter '{path}' is of PEFT type {peft_type}; only LORA adapters can be merged")
    for flag, name in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D)"), ("lora_bias", "lora_bias")):
        if config.get(flag):
            raise PluribusError(f"adapter '{path}' uses {name}, which pluribus cannot merge; use plain LoRA adapters")
    if config.get("modules_to_save"):
        raise PluribusError(
            f"adapter '{path}' has modules_to_save {config['modules_to_save']} (full weights); merge only LoRA weights"
        )
    if not st_path.is_file():
        raise PluribusError(f"adapter '{path}' has no adapter_model.safetensors (pluribus never reads pickle files)")
    tensors: dict[str, Tensor] = {}
    try:
        with safe_open(st_path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise PluribusError(f"adapter weights '{st_path}' are corrupt or truncated ({e}); re-save the adapter") from None
    r0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rs = bool(config.get("use_rslora", False))
    modules: dict[str, LoraModule] = {}
    others = [k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if others:
        raise PluribusError(_not_lora(path, others, config))
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        b_key = key.replace(".lora_A.weight", ".lora_B.weight")
        if b_key not in tensors:
            raise PluribusError(f"adapter '{path}' has {key} but no {b_key}; the file is incomplete")
        b = tensors[b_key]
        M.check_finite(a, f"{path}:{key}")
        M.check_finite(b, f"{path}:{b_key}")
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise PluribusError(f"adapter '{path}' module {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not chain")
        r = int(_pattern_value(config.get("rank_pattern") or {}, name, r0))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, alpha0))
        if r != a.shape[0]:
            raise PluribusError(f"adapter '{path}' module {name}: config says rank {r}, weights have rank {a.shape[0]}")
        scaling = alpha / math.sqrt(r) if rs else alpha / r
        modules[name] = LoraModule(a, b, scaling)
    if not modules:
        raise PluribusError(f"adapter '{path}' holds no lora_A/lora_B weights")
    return Adapter(path, config, modules)


def _not_lora(path: Path, keys: list[str], config: dict[str, Any]) -> str:
    """The refusal of tensors other than lora_A/lora_B: each is a full tensor (or a delta of one) that B A does
    not carry, so a merge of the factors alone would drop what it changes, with a relative error of 0 printed."""
    key = keys[0]
    if ".lora_embedding_" in key:
        what, fix = "an embedding LoRA", "LoRA on linear modules only"
    elif "trainable_tokens" in key or "token_adapter" in key:
        what, fix = "trainable tokens (trainable_token_indices)", "trainable_token_indices unset"
    elif "modules_to_save" in key:
        what, fix = "full copies of modules (modules_to_save)", "modules_to_save unset"
    elif key.endswith(".bias"):
        what, fix = f"biases (bias: {config.get('bias', '?')!r})", "bias: none"
    else:
        what, fix = "tensors other than lora_A/lora_B", "a plain LoRA config"
    return (f"adapter '{path}' also trains {what}, e.g. {key} ({len(keys)} tensor(s)), which a merge in low-rank space "
            f"cannot carry and will not drop; retrain with {fix}, or fold each adapter into its base with PEFT "
            "(merge_and_unload) and merge the models")


def _check_one_base(adapters: list[Adapter]) -> None:
    """Refuse adapters of different bases. A base on this machine is compared by its contents (config.json and
    a weights fingerprint: the same model under a relative path, an absolute one or a copy is one base); bases
    that are not here are compared by name; one here and one not cannot be compared and pass."""
    from pluribus.merge.full import base_identity

    known = [(a, base_identity(a.base)) for a in adapters if a.base]
    for (a, ida), (b, idb) in zip(known, known[1:], strict=False):
        if ida is not None and idb is not None:
            same, why = ida == idb, "their config.json or weights differ"
        elif ida is None and idb is None:
            same, why = a.base == b.base, "neither is on this machine to compare by contents"
        else:
            if a.base != b.base:
                logging.getLogger("pluribus.merge").warning(
                    "adapters '%s' (base %s) and '%s' (base %s): only one base is on this machine, so they cannot "
                    "be compared; merging them as one base", a.path, a.base, b.path, b.base)
            continue
        if not same:
            raise PluribusError(
                f"adapters have different base models: '{a.path}' -> {a.base}, '{b.path}' -> {b.base} ({why}); "
                "merge adapters of one base (or pass --no-check-base / check_base: false if they are one model)"
            )


def check_compatible(adapters: list[Adapter], check_base: bool = True) -> dict[str, tuple[int, int]]:
    """Shapes ``(d_out, d_in)`` per module over all adapters; raises naming both sides of any mismatch."""
    if check_base:
        _check_one_base(adapters)
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, Path] = {}
    for a in adapters:
        for name, m in a.modules.items():
            shape = (m.B.shape[0], m.A.shape[1])
            if name in shapes and shapes[name] != shape:
                raise PluribusError(
                    f"module {name} is {shapes[name]} in '{owner[name]}' but {shape} in '{a.path}'; "
                    "these adapters are for different base models"
                )
            shapes.setdefault(name, shape)
            owner.setdefault(name, a.path)
    return dict(sorted(shapes.items()))


# -------------------------------------------------------------------------------------------- merge


@dataclass
class AdapterMerge:
    """The merged factors per module (delta = B @ A, scaling 1) and the relative error of each."""

    modules: dict[str, tuple[Tensor, Tensor]]
    errors: dict[str, float] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {k: a.shape[0] for k, (a, _) in self.modules.items()}

    @property
    def total_error(self) -> float:
        """||exact - merged||_F / ||exact||_F over all modules together."""
        num = sum((self.errors.get(k, 0.0) * n) ** 2 for k, n in self.norms.items())
        den = sum(n**2 for n in self.norms.values())
        return math.sqrt(num / den) if den > 0 else 0.0


def stacked_factors(
    adapters: list[Adapter], coefs: list[float], name: str, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """``(B_cat, A_cat)`` with ``B_cat @ A_cat = sum_t coefs_t s_t B_t A_t`` for one module (``dtype``).

    Each coefficient is split as sqrt|c| into A and sign(c) sqrt|c| into B so both factors keep the same scale.
    float64 by default: when adapters nearly cancel (weights 1 and -0.99999) the sum is 1e-5 of each term, and
    float32 rounding of the scaled factors (1e-7 of each term) would be 1e-2 of the result.
    """
    present = [(c, a.modules[name]) for a, c in zip(adapters, coefs, strict=True) if name in a.modules]
    rank = sum(m.rank for _, m in present)
    first = present[0][1]
    b_cat = torch.empty(first.B.shape[0], rank, dtype=dtype)
    a_cat = torch.empty(rank, first.A.shape[1], dtype=dtype)
    at = 0
    for c, m in present:
        k = c * m.scaling
        root = math.sqrt(abs(k))
        # into the stacks directly: one pass over each factor, converted first so the scaling is exact
        torch.mul(m.A.to(dtype), root, out=a_cat[at : at + m.rank])
        torch.mul(m.B.to(dtype), root if k >= 0 else -root, out=b_cat[:, at : at + m.rank])
        at += m.rank
    return b_cat, a_cat


def product_norm(B: Tensor, A: Tensor) -> float:
    """``||B @ A||_F`` in float64 without forming the product: ``||R_b R_a^T||_F`` from QR of B and A^T (stable
    even when the columns of B nearly cancel, where a trace of Gram matrices would subtract large terms)."""
    rb = torch.linalg.qr(B.double(), mode="r").R
    ra = torch.linalg.qr(A.double().T, mode="r").R
    return float(torch.linalg.matrix_norm(rb @ ra.T))


def method_params(spec: MergeSpec) -> M.MethodParams:
    """Per-expert parameters of ``spec`` (an expert's own density/drop overrides the spec's)."""
    return M.MethodParams(
        weights=tuple(i.weight for i in spec.inputs),
        density=tuple(i.density if i.density is not None else (spec.density or 1.0) for i in spec.inputs),
        drop=tuple(i.drop if i.drop is not None else (spec.drop or 0.0) for i in spec.inputs),
        lam=spec.lam,
        normalize=spec.normalize,
        mergekit=spec.mergekit,
    )


class AdapterPlan:
    """The merge of ``adapters`` (in ``spec.inputs`` order) module by module: exact factors or dense deltas."""

    def __init__(self, spec: MergeSpec, adapters: list[Adapter]):
        self.spec, self.adapters = spec, adapters
        self.shapes = check_compatible(adapters, spec.check_base)
        self.params = method_params(spec)
        weights = self.params.weights
        scale = spec.lam
        # the factors carry the whole weighting of the low-rank methods, so `normalize` is applied here
        normalize = M.default_normalize(spec.method, spec.mergekit) if spec.normalize is None else spec.normalize
        if spec.method in ("linear", "task_arithmetic") and normalize:
            if abs(sum(weights)) < 1e-8:
                raise PluribusError(f"{spec.method} merge weights sum to 0; give weights with a non-zero sum")
            scale = spec.lam / sum(weights)
        self.coefs = [w * scale for w in weights]
        self.default_rank = max(max(a.ranks) for a in adapters)
        #: the dtype an adapter output is stored in (out_dtype; float32 by default)
        self.store_dtype = getattr(torch, spec.out_dtype) if spec.out_dtype else torch.float32
        self.generator = torch.Generator().manual_seed(spec.seed)
        if spec.method in ("ties", "magnitude") and spec.trim == "global":
            # an expert's task vector is its own modules: those it lacks are not part of its density
            thresholds = tuple(
                M.global_threshold(
                    lambda t=t: (m.delta() for _, m in sorted(adapters[t].modules.items())), self.params.density[t]
                )
                for t in range(len(adapters))
            )
            self.params = dataclasses.replace(self.params, thresholds=thresholds)

    @property
    def low_rank(self) -> bool:
        """Whether the merged delta is exactly the product of stacked factors (no dense step)."""
        return self.spec.method in ("cat", "svd", "linear", "task_arithmetic")

    def _deltas(self, name: str, shape: tuple[int, int]) -> list[Tensor]:
        return [a.modules[name].delta() if name in a.modules else torch.zeros(shape) for a in self.adapters]

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """Exact ``(B_cat, A_cat)`` of a low-rank method."""
        return stacked_factors(self.adapters, self.coefs, name)

    def dense(self, name: str) -> Tensor:
        """The merged dense delta of one module [d_out, d_in] (float32)."""
        if self.low_rank:
            b, a = self.factors(name)
            return (b @ a).float()
        return M.merge_deltas(self.spec.method, self._deltas(name, self.shapes[name]), self.params, self.generator)

    def compressed(self, name: str) -> tuple[Tensor, Tensor, float, float]:
        """``(A, B, relative error, exact norm)`` of one module at the spec's rank or energy."""
        rank = self.spec.rank or (None if self.spec.energy else self.default_rank)
        store = self.store_dtype
        if self.spec.method == "cat":
            b, a = self.factors(name)
            bs, as_ = b.to(store), a.to(store)
            # exact up to storing the factors, which is what the error reports
            norm = product_norm(b, a)
            err = product_norm(torch.cat([b, -bs.double()], 1), torch.cat([a, as_.double()], 0))
            return as_, bs, (err / norm if norm > 0 else 0.0), norm
        if self.low_rank:
            b, a = self.factors(name)
            low = M.truncate_factors(b, a, rank=rank, energy=self.spec.energy)
        else:
            dense = self.dense(name)
            low = M.truncate_dense(dense, rank=rank, energy=self.spec.energy)
        bs, as_ = low.B.to(store), low.A.to(store)
        if store == torch.float32 or low.exact_norm == 0:
            return as_, bs, low.error, low.exact_norm  # float32 storage moves the result ~1e-7: below the figure
        # half precision moves it ~1e-3: the error is measured on the stored factors
        if self.low_rank:
            err = product_norm(torch.cat([b, -bs.double()], 1), torch.cat([a, as_.double()], 0))
        else:
            err = float(torch.linalg.matrix_norm(dense.double() - bs.double() @ as_.double()))
        return as_, bs, err / low.exact_norm, low.exact_norm


def merge_adapters(
    spec: MergeSpec,
    adapters: list[Adapter],
    advance: Callable[[str], None] | None = None,
    workers: int | None = None,
) -> AdapterMerge:
    """Merge ``adapters`` into one adapter per ``spec``; ``advance(module)`` ticks a progress bar.

    Modules are independent, so deterministic methods run them on ``workers`` threads (default: torch's thread
    count), each op single-threaded: the per-module LAPACK calls on R x R matrices are too small to parallelize
    inside, but several run side by side. DARE draws from one seeded generator in module order, so it stays serial.
    """
    plan = AdapterPlan(spec, adapters)
    out = AdapterMerge(modules={})
    names = list(plan.shapes)
    workers = max(1, workers or torch.get_num_threads())
    if workers == 1 or spec.method.startswith("dare") or len(names) < 2:
        with M.numpy_blas_capped():
            _collect(out, names, map(plan.compressed, names), advance)
        return out
    # the caller's own OpenMP team would spin on a core the workers need: one thread here while they run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with M.numpy_blas_capped():
            _collect(out, names, _pool(workers).map(plan.compressed, names), advance)
    finally:
        torch.set_num_threads(threads)
    return out


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A long-lived pool of single-threaded torch workers: a fresh thread pays BLAS/LAPACK set-up on first use."""
    if workers not in _POOLS:
        # OpenMP's thread count is per calling thread: each worker sets its own
        _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pluribus-merge",
                                             initializer=torch.set_num_threads, initargs=(1,))
    return _POOLS[workers]


def _collect(
    out: AdapterMerge,
    names: list[str],
    results: Iterable[tuple[Tensor, Tensor, float, float]],
    advance: Callable[[str], None] | None,
) -> None:
    for name, (a, b, err, norm) in zip(names, results, strict=True):
        out.modules[name], out.errors[name], out.norms[name] = (a, b), err, norm
        if advance:
            advance(name)


def save_adapter(folder: Path, merged: AdapterMerge, template: dict[str, Any]) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by ``PeftModel.from_pretrained``.

    Every module has scaling 1: ``lora_alpha = r`` globally and ``alpha_pattern[m] = rank_pattern[m] = r_m`` where
    a module's rank differs from the most common one. Keys of the patterns are the escaped full module names.
    """
    ranks = merged.ranks
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r0 = max(counts, key=lambda r: (counts[r], r))
    pattern = {re.escape(k): r for k, r in ranks.items() if r != r0}
    # written directly (importing peft costs seconds); PEFT fills every other field with its default
    config = {
        "peft_type": "LORA",
        "task_type": template.get("task_type") or "CAUSAL_LM",
        "base_model_name_or_path": template.get("base_model_name_or_path"),
        "r": r0,
        "lora_alpha": r0,
        "target_modules": sorted(ranks),
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for name, (a, b) in merged.modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
