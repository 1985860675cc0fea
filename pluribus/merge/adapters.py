"""Merge PEFT LoRA adapters of one base directly in low-rank space, never loading the base model's weights.

Each adapter t contributes ``delta_t(m) = s_t(m) B_t(m) A_t(m)`` to module m, with ``s = alpha / r`` (or
``alpha / sqrt(r)`` under rsLoRA; ``rank_pattern`` / ``alpha_pattern`` per module). A module an adapter lacks
counts as zero. The weighted sum ``lambda sum_t w_t delta_t(m) = B_cat A_cat`` is exact with
``B_cat = [c_1 B_1 | ... | c_T B_T]`` and ``A_cat = [A_1; ...; A_T]`` (``c_t = lambda w_t s_t``):
  * the linear methods (the registry's ``linear``: ``cat``, ``linear``, ``task_arithmetic``) write exactly that
    (rank sum r_t) unless a rank or an energy is asked for;
  * ``svd``, or a linear method given ``rank`` / ``energy``, writes its best rank-k approximation from the factors
    (methods.truncate_factors), or per module the smallest rank keeping an energy fraction (``rank_pattern``);
  * the other methods (``ties`` / ``dare_*`` / ``magnitude`` / ``pcb``) act on each module's dense delta (the only
    basis-independent choice: low-rank factors are defined up to an invertible r x r map), then compress back to
    rank k (default: the largest input rank; the summary reports the error against the dense result).
Output adapters have scaling 1 (``lora_alpha = r`` per module) so the stored factors are the delta itself.

Besides the factors an adapter may change other tensors of its base, and each is merged as its own task vector
(never dropped): a LoRA bias (``lora_bias: true``) adds ``s b_B`` to its module's bias; trained biases
(``bias: lora_only`` / ``all``) and the modules of ``modules_to_save`` are stored as full values ``theta_t``, whose
task vector ``theta_t - theta_base`` needs the base (``base:``, else the base the adapters record). These tensors are
merged by the same method as the modules (a sum for the low-rank methods, the method itself for the dense ones)
and written at full rank: the base plus the merged delta (or the merged LoRA bias). Trainable tokens and embedding
LoRAs are refused.
"""

from __future__ import annotations

import dataclasses
import functools
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

from pluribus.adapter import read_adapter_config
from pluribus.errors import PluribusError
from pluribus.merge import methods as M
from pluribus.merge.blas import capped_gram
from pluribus.merge.registry import get_method, merge_deltas
from pluribus.merge.spec import MergeSpec

PREFIX = "base_model.model."
Tensor = torch.Tensor


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``delta = scaling * B @ A`` with A [r, d_in], B [d_out, r]; ``bias`` [d_out] is lora_B's
    bias (``lora_bias: true``), which adds ``scaling * bias`` to the module's bias."""

    A: Tensor
    B: Tensor
    scaling: float
    bias: Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scaling


@dataclass
class Adapter:
    """A loaded PEFT LoRA adapter: its folder, its config and its modules by name (``model.layers.0...q_proj``).

    ``full`` holds the base tensors it sets to values of its own, by the base's tensor name
    (``model.layers.0.self_attn.q_proj.bias``): trained biases (``bias: lora_only`` / ``all``) and the weights of its
    ``modules_to_save``.
    """

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    full: dict[str, Tensor] = field(default_factory=dict)

    def other_deltas(self, base: Callable[[str], Tensor], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The task vector of every tensor it changes besides the LoRA weights, by base tensor name: ``theta - base``
        of its full tensors (``base(name)`` gives the base's value) plus ``s b_B`` of its LoRA biases."""
        out = {name: t.to(dtype) - base(name).to(dtype) for name, t in self.full.items()}
        for module, m in self.modules.items():
            if m.bias is not None:
                name = f"{module}.bias"
                lora = m.bias.to(dtype) * m.scaling
                out[name] = out[name] + lora if name in out else lora
        return out

    @property
    def other_names(self) -> set[str]:
        """The base tensors it changes besides the LoRA weights (see :meth:`other_deltas`)."""
        return set(self.full) | {f"{k}.bias" for k, m in self.modules.items() if m.bias is not None}

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
    for flag, name in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D)")):
        if config.get(flag):
            raise PluribusError(f"adapter '{path}' uses {name}, which pluribus cannot merge; use plain LoRA adapters")
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
    full, lora_bias, others = _full_tensors(tensors, config)
    if others:
        raise PluribusError(_not_lora(path, others, config))
    for key, t in [*full.items(), *lora_bias.items()]:
        M.check_finite(t, f"{path}:{key}")
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
        bias = lora_bias.pop(name, None)
        if bias is not None and bias.shape != (b.shape[0],):
            raise PluribusError(f"adapter '{path}' module {name}: lora_B bias {tuple(bias.shape)} does not fit lora_B "
                                f"{tuple(b.shape)}; the file is corrupt")
        modules[name] = LoraModule(a, b, scaling, bias)
    if lora_bias:
        raise PluribusError(f"adapter '{path}' has a lora_B bias for {next(iter(lora_bias))} but no lora_A/lora_B "
                            "weights there; the file is incomplete")
    if not modules:
        raise PluribusError(f"adapter '{path}' holds no lora_A/lora_B weights")
    return Adapter(path, config, modules, {_base_name(k): t for k, t in full.items()})


def _saved_module(module: str, saved: list[str]) -> bool:
    """Whether ``module`` is one of ``modules_to_save`` (PEFT matches a name or a dotted suffix)."""
    return any(module == m or module.endswith("." + m) for m in saved)


def _base_values(spec: MergeSpec, adapters: list[Adapter], shapes: dict[str, tuple[int, int]]) -> dict[str, Tensor]:
    """The base's values of the tensors the adapters store as full values (their task vectors are the differences),
    read from ``spec.base``, else from the base the adapters record; refused when no base is on this machine."""
    from pluribus.adapter import recorded_base_folder
    from pluribus.merge.checkpoint import Checkpoint, check_same_weights, local_model

    names = sorted(set().union(*(a.full for a in adapters)))
    if not names:
        return {}
    for a in adapters:
        mixed = next((n for n in a.full if n.endswith(".weight") and n.removesuffix(".weight") in shapes), None)
        if mixed is not None:
            raise PluribusError(f"adapter '{a.path}' saves module {mixed.removesuffix('.weight')} whole "
                                "(modules_to_save) while another adapter trains a LoRA on it; merge adapters that "
                                "treat each module alike")
    owner = next(a for a in adapters if a.full)
    folder = local_model(spec.base) if spec.base else recorded_base_folder(owner.base or "")
    if folder is None:
        raise PluribusError(
            f"adapter '{owner.path}' stores full values of {len(owner.full)} base tensor(s) (trained biases or "
            f"modules_to_save, e.g. {next(iter(owner.full))}), whose task vector is their difference from the base, "
            f"and {f'its base {owner.base!r} is not on this machine' if owner.base else 'it records no base'}; "
            "give the base model folder with base: (--base)")
    if spec.base and spec.check_base:
        for a in adapters:
            check_same_weights(a, folder)
    ck = Checkpoint(folder)
    try:
        out: dict[str, Tensor] = {}
        for n in names:
            for a in (a for a in adapters if n in a.full):
                if n not in ck.tensors or ck.tensors[n].shape != tuple(a.full[n].shape):
                    found = f"has it as {ck.tensors[n].shape}" if n in ck.tensors else "lacks it"
                    raise PluribusError(f"adapter '{a.path}' sets {n} {tuple(a.full[n].shape)}, but base '{folder}' "
                                        f"{found}; the adapter was trained on another base")
            out[n] = ck.get(n)
    finally:
        ck.close()
    return out


def _base_name(key: str) -> str:
    """The base model's tensor name of an adapter key: PEFT saves a LoRA module's own bias under ``base_layer``."""
    return key.removeprefix(PREFIX).replace(".base_layer.", ".")


def _full_tensors(
    tensors: dict[str, Tensor], config: dict[str, Any]
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """Split the keys besides lora_A/lora_B weights: (full values by key, lora_B biases by module, the rest).

    Full values are the biases PEFT trains under ``bias: lora_only`` / ``all`` (``<module>[.base_layer].bias``) and
    the parameters of ``modules_to_save`` (``<module>.<param>``, PEFT's saved form); anything else is the rest.
    """
    saved = list(config.get("modules_to_save") or [])
    full: dict[str, Tensor] = {}
    lora_bias: dict[str, Tensor] = {}
    rest = []
    for key, t in tensors.items():
        if key.endswith((".lora_A.weight", ".lora_B.weight")):
            continue
        module = key.removeprefix(PREFIX).rsplit(".", 1)[0]
        if key.endswith(".lora_B.bias"):
            lora_bias[module.removesuffix(".lora_B")] = t
        elif "lora_" in key or "trainable_tokens" in key or "modules_to_save" in key:
            rest.append(key)
        elif _saved_module(module, saved) or key.endswith(".bias"):
            full[key] = t
        else:
            rest.append(key)
    return full, lora_bias, rest


def _not_lora(path: Path, keys: list[str], config: dict[str, Any]) -> str:
    """The refusal of tensors pluribus does not merge (it never drops them: the merge would print a relative error
    of 0 without what they change). Trainable tokens are refused on purpose: each adapter stores the rows of its own
    token ids (a tied lm_head shares them), which no other tensor of the merge is, so their task vectors are not
    aligned like the rest; fold them with PEFT and merge the models instead."""
    key = keys[0]
    if ".lora_embedding_" in key:
        what, fix = "an embedding LoRA", "LoRA on linear modules only"
    elif "trainable_tokens" in key or "token_adapter" in key:
        what, fix = "trainable tokens (trainable_token_indices)", "trainable_token_indices unset"
    elif "modules_to_save" in key:
        what, fix = "full copies of modules (modules_to_save) in a form PEFT does not save", "a current PEFT"
    else:
        what, fix = "tensors other than LoRA factors, biases and modules_to_save", "a plain LoRA config"
    return (f"adapter '{path}' also trains {what}, e.g. {key} ({len(keys)} tensor(s)), which pluribus does not merge "
            f"and will not drop; retrain with {fix}, or fold each adapter into its base with PEFT "
            "(merge_and_unload) and merge the models")


def _check_one_base(adapters: list[Adapter]) -> None:
    """Refuse adapters of different bases. A base on this machine is compared by its contents (config.json and
    a weights fingerprint: the same model under a relative path, an absolute one or a copy is one base); bases
    that are not here are compared by name; one here and one not cannot be compared and pass."""
    from pluribus.merge.checkpoint import base_identity

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
    """The merged factors per module (delta = B @ A, scaling 1), the other tensors, and the relative error of each.

    ``others``: the base tensors merged besides the modules' weights, each written either in ``full`` (base + merged
    delta, by base tensor name) or in ``biases`` (lora_B biases by module: the merged bias delta, scaling 1);
    ``modules_to_save``: the output's list. ``errors`` and ``norms`` cover modules and the other tensors alike.
    """

    modules: dict[str, tuple[Tensor, Tensor]]
    errors: dict[str, float] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    full: dict[str, Tensor] = field(default_factory=dict)
    biases: dict[str, Tensor] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)  # the base tensors merged besides the modules' weights

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


def linear_coefficients(method: Any, params: M.MethodParams) -> list[float]:
    """``c_t`` with ``method(delta_1..T) = sum_t c_t delta_t`` for a linear method (the registry's ``linear``): the
    method itself applied to the unit task vectors ``e_t`` of R^T, in float64, so whatever its registered function
    does with the weights, lambda and normalize is what the factors carry."""
    normalize = method.normalize_default(params.mergekit) if params.normalize is None else params.normalize
    if normalize and abs(sum(params.weights)) < 1e-8:
        raise PluribusError(f"{method.name} merge weights sum to 0; give weights with a non-zero sum")
    n = len(params.weights)
    units = list(torch.eye(n, dtype=torch.float64))
    return [float(c) for c in method.fn(units, dataclasses.replace(params, normalize=normalize), None, False)]


class AdapterPlan:
    """The merge of ``adapters`` (in ``spec.inputs`` order) module by module: exact factors or dense deltas."""

    def __init__(self, spec: MergeSpec, adapters: list[Adapter]):
        self.spec, self.adapters = spec, adapters
        self.shapes = check_compatible(adapters, spec.check_base)
        self.params = method_params(spec)
        self.method = get_method(spec.method)
        #: c_t of a linear method's ``sum_t c_t delta_t``, which the stacked factors carry
        self.coefs = linear_coefficients(self.method, self.params) if self.method.linear else []
        normalize = self.method.normalize_default(spec.mergekit) if spec.normalize is None else spec.normalize
        if self.method.of_weights and not normalize and abs(sum(self.params.weights) - 1) > 1e-6:
            # sum_t w_t theta_t counts the base sum_t w_t times, which an adapter on one base cannot carry
            raise PluribusError(
                f"{spec.method} with normalize: false is the weighted sum of the models' weights, base included, and "
                f"the weights sum to {sum(self.params.weights):g}, not 1: adapters on one base cannot be that; use "
                "task_arithmetic for the weighted sum of the task vectors, normalize: true, or weights summing to 1")
        #: the output rank of a truncating merge given neither rank nor energy (the registry's default_rank)
        self.default_rank = (sum if self.method.default_rank == "sum" else max)(max(a.ranks) for a in adapters)
        #: the dtype an adapter output is stored in (out_dtype; float32 by default)
        self.store_dtype = getattr(torch, spec.out_dtype) if spec.out_dtype else torch.float32
        self.generator = torch.Generator().manual_seed(spec.seed)
        #: the base tensors changed besides the LoRA weights (biases, modules_to_save), and the base values of those
        #: an adapter stores as full values
        self.others = sorted(set().union(*(a.other_names for a in adapters)))
        self.base_values = _base_values(spec, adapters, self.shapes)
        if "trim" in self.method.options and spec.trim == "global":
            # an expert's task vector is its own modules and tensors: those it lacks are not part of its density
            def chunks(t: int) -> Iterable[Tensor]:
                yield from (m.delta() for _, m in sorted(adapters[t].modules.items()))
                yield from adapters[t].other_deltas(self.base_values.__getitem__).values()

            thresholds = tuple(M.global_threshold(lambda t=t: chunks(t), self.params.density[t])
                               for t in range(len(adapters)))
            self.params = dataclasses.replace(self.params, thresholds=thresholds)

    @property
    def low_rank(self) -> bool:
        """Whether the merged delta is exactly the product of stacked factors (no dense step): a linear method."""
        return self.method.linear

    @property
    def exact(self) -> bool:
        """Whether the output is the stacked factors themselves (rank: the inputs' ranks summed): a linear method
        whose default rank is the exact one, given neither rank nor energy."""
        return self.low_rank and self.method.default_rank == "sum" and self.spec.rank is None and self.spec.energy is None

    def _deltas(self, name: str, shape: tuple[int, int]) -> list[Tensor]:
        return [a.modules[name].delta() if name in a.modules else torch.zeros(shape) for a in self.adapters]

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """Exact ``(B_cat, A_cat)`` of a low-rank method."""
        return stacked_factors(self.adapters, self.coefs, name)

    def dense(self, name: str, device: Any = None) -> Tensor:
        """The merged dense delta of one module [d_out, d_in] (float32); a low-rank method's product ``B A`` on
        ``device`` (None: the CPU), the other methods' seeded draws on the CPU."""
        if self.low_rank:
            b, a = self.factors(name)
            return (b.to(device) @ a.to(device)).float() if device is not None else (b @ a).float()
        return merge_deltas(self.spec.method, self._deltas(name, self.shapes[name]), self.params, self.generator)

    def other(self, name: str) -> Tensor:
        """The merged delta of a base tensor changed besides the LoRA weights (``self.others``), by the spec's method:
        the weighted sum in float64 for the low-rank methods (their exact result), the method in float32 otherwise."""
        dtype = torch.float64 if self.low_rank else torch.float32
        per = [a.other_deltas(self.base_values.__getitem__, dtype) for a in self.adapters]
        shape = next(d[name].shape for d in per if name in d)
        deltas = [d.get(name, torch.zeros(shape, dtype=dtype)) for d in per]
        if self.low_rank:
            out = torch.zeros(shape, dtype=dtype)
            for c, d in zip(self.coefs, deltas, strict=True):
                out.add_(d, alpha=c)
            return out
        return merge_deltas(self.spec.method, deltas, self.params, self.generator)

    @property
    def lora_bias(self) -> bool:
        """Whether the output carries bias deltas as lora_B biases (an input does): else as full values."""
        return any(m.bias is not None for a in self.adapters for m in a.modules.values())

    def stored_other(self, name: str) -> tuple[str, str, Tensor, float, float]:
        """How tensor ``name`` of ``self.others`` is written into an adapter output: ``("bias", module)`` for a lora_B
        bias or ``("full", name)`` for a full value, the stored tensor, its relative error vs the exact merged delta
        (storage rounding only: it is written at full rank) and that delta's norm."""
        delta = self.other(name).double()
        norm = float(delta.norm())
        module = name.removesuffix(".bias")
        if self.lora_bias and name.endswith(".bias") and module in self.shapes:
            stored, exact = delta.to(self.store_dtype), delta
            kind, key = "bias", module
        else:
            exact = self.base_values[name].double() + delta
            stored, kind, key = exact.to(self.store_dtype), "full", name
        err = float((stored.double() - exact).norm())
        return kind, key, stored, (err / norm if norm > 0 else 0.0), norm

    def compressed(self, name: str, gram: Callable[[Tensor], Tensor] = M.gram) -> tuple[Tensor, Tensor, float, float]:
        """``(A, B, relative error, exact norm)`` of one module at the spec's rank or energy (``gram``: the Gram
        product of methods.truncate_factors)."""
        rank = self.spec.rank or (None if self.spec.energy else self.default_rank)
        store = self.store_dtype
        if self.exact:
            b, a = self.factors(name)
            bs, as_ = b.to(store), a.to(store)
            # exact up to storing the factors, which is what the error reports
            norm = product_norm(b, a)
            err = product_norm(torch.cat([b, -bs.double()], 1), torch.cat([a, as_.double()], 0))
            return as_, bs, (err / norm if norm > 0 else 0.0), norm
        if self.low_rank:
            b, a = self.factors(name)
            low = M.truncate_factors(b, a, rank=rank, energy=self.spec.energy, gram=gram)
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
    if workers == 1 or plan.method.random or len(names) < 2:
        with capped_gram() as gram:
            _collect(out, names, map(functools.partial(plan.compressed, gram=gram), names), advance)
    else:
        # the caller's own OpenMP team would spin on a core the workers need: one thread here while they run
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with capped_gram() as gram:
                _collect(out, names, _pool(workers).map(functools.partial(plan.compressed, gram=gram), names), advance)
        finally:
            torch.set_num_threads(threads)
    # after the modules, in a fixed order: DARE's draws for the modules stay those of an adapter without them
    out.others = plan.others
    for name in plan.others:
        kind, key, stored, err, norm = plan.stored_other(name)
        (out.biases if kind == "bias" else out.full)[key] = stored
        out.errors[name], out.norms[name] = err, norm
    if plan.lora_bias:  # PEFT gives every module a lora_B bias: those without one are zero
        for name, (_, b) in out.modules.items():
            out.biases.setdefault(name, torch.zeros(b.shape[0], dtype=b.dtype))
    out.modules_to_save = sorted({m for a in adapters for m in a.config.get("modules_to_save") or []})
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
    # a full bias of a LoRA module is its base layer's (PEFT's key); of another module (bias: all), the module's own
    lora_module_biases = [n for n in merged.full if n.endswith(".bias") and n.removesuffix(".bias") in ranks]
    saved = merged.modules_to_save
    other_biases = [n for n in merged.full if n.endswith(".bias") and n not in lora_module_biases
                    and not _saved_module(n.removesuffix(".bias"), saved)]
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
        "bias": "all" if other_biases else "lora_only" if lora_module_biases else "none",
        "lora_bias": bool(merged.biases),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": saved or None,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for name, (a, b) in merged.modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
    for name, bias in merged.biases.items():
        tensors[f"{PREFIX}{name}.lora_B.bias"] = bias.contiguous()
    for name, t in merged.full.items():
        key = name.removesuffix(".bias") + ".base_layer.bias" if name in lora_module_biases else name
        tensors[f"{PREFIX}{key}"] = t.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
