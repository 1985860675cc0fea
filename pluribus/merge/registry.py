"""The merge methods: one registration each (its options and their defaults, low-rank exactness, the math),
their lookup, and the dispatch of a merge over tensors (:func:`merge_deltas`) to them.

A method is a plain function over the task vectors of one tensor, registered with :func:`merge_method` (as
mergekit's ``@merge_method``)::

    @merge_method("task_arithmetic", linear=True, options=("rank", "energy", "normalize"), mergekit="task_arithmetic",
                  cite="Task Arithmetic, Ilharco et al. 2023 (arXiv:2212.04089)")
    def task_arithmetic(ds, p, generator, stacked):
        '''``lambda sum_t w_t delta_t`` (divided by ``sum_t w_t`` with normalize).'''
        return _math().weighted_sum(ds, p, stacked=stacked)

``fn(ds, p, generator, stacked) -> Tensor``: ``ds`` the T task vectors of one tensor in the work dtype (the
function may overwrite them), ``p`` the resolved ``methods.MethodParams`` (``p.normalize`` is a bool), ``generator``
the seeded ``torch.Generator`` of random methods, ``stacked`` whether to compute over the stacked ``[T, ...]``
tensor op for op (mergekit's order of roundings in half precision, and the reference the tests compare with).

Everything else reads this registry: the spec's validation and its refusal of options a method does not read
(spec.py), the CLI's ``--method`` help, the mergekit translation (mergekit.py), the adapter merge's low-rank
decision, coefficients and default rank (adapters.py), the dispatch over tensors (:func:`merge_deltas`, used by
adapters.py and full.py) and the README's table.

One weighting convention holds for every method and every entry point (CLI, recipe ``merge.experts``, ``spec:``,
merge YAML, mergekit YAML): each input's weight defaults to 1 (mergekit's convention), so ``task_arithmetic`` is
the sum of the task vectors; a mean is spelled: explicit weights, ``normalize: true``, or method ``linear``.

This module imports no torch (the CLI's help and recipe validation read it); the functions import the math steps
(merge/methods.py, which never imports this module) when called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pluribus.errors import PluribusError

if TYPE_CHECKING:
    import torch

    from pluribus.merge.methods import MethodParams

@dataclass(frozen=True)
class Option:
    """An option a method may read: its default (None: see the help) and what it does."""

    default: Any
    help: str


#: Every option a method may read. normalize's default is each method's own (its registration says it).
OPTIONS: dict[str, Option] = {
    "rank": Option(None, "output adapter rank (adapter outputs; left out: the method's default rank)"),
    "energy": Option(None, "per-module output rank keeping this fraction of the energy (adapter outputs)"),
    "density": Option(1.0, "fraction of each task vector's entries kept, in (0, 1]"),
    "drop": Option(0.0, "DARE drop rate p, in [0, 1); mergekit's density is 1 - drop"),
    "normalize": Option(None, "divide by the summed weights (of the agreeing experts for TIES)"),
    "trim": Option("tensor", "TIES / magnitude trimming per tensor or over the whole model (global)"),
}

#: Every method also reads ``weight`` per input (default 1: the sum), ``lambda`` (default 1) and ``seed`` (DARE).
WEIGHT_DEFAULT = 1.0

MethodFn = Callable[["list[torch.Tensor]", "MethodParams", "torch.Generator | None", bool], "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    """One registered method. ``linear``: the merged delta is ``sum_t c_t delta_t`` (``c_t = lambda w_t``, divided
    by ``sum_t w_t`` under normalize), which adapters keep exactly as stacked low-rank factors; otherwise the
    method needs each module's dense delta and an adapter output is its truncated SVD."""

    name: str
    fn: MethodFn
    math: str  # the function's docstring: what it computes
    cite: str  # the paper it follows
    options: tuple[str, ...]  # the options it reads (any other is refused)
    linear: bool
    default_rank: Literal["sum", "largest"]  # adapter output rank without rank/energy: exact, or the largest input's
    normalize: bool | None = None  # normalize's default, where the method reads it
    normalize_mergekit: bool | None = None  # ... under mergekit: true, where it differs
    mergekit: str | None = None  # mergekit's merge_method of the same math (``mergekit: true`` reproduces it)
    mergekit_mode: bool = False  # whether ``mergekit: true`` changes anything (else it is refused)
    adapters_only: bool = False  # merges LoRA factors only (no model form)
    random: bool = False  # draws from the seeded generator (the merge then runs serially)
    of_weights: bool = False  # over models: merges the weights themselves (a soup), not task vectors

    def option_text(self) -> str:
        """Its options with their defaults, as the README's table shows them."""
        out = []
        for name in self.options:
            if name == "normalize":
                out.append(f"normalize={str(self.normalize).lower()}" + (
                    f" (mergekit: {str(self.normalize_mergekit).lower()})" if self.normalize_mergekit is not None else ""))
            else:
                default = OPTIONS[name].default
                out.append(name if default is None else f"{name}={default:g}" if isinstance(default, float)
                           else f"{name}={default}")
        return ", ".join(out) or "(none)"

    def normalize_default(self, mergekit: bool) -> bool:
        if mergekit and self.normalize_mergekit is not None:
            return self.normalize_mergekit
        return bool(self.normalize)

    @property
    def rank_rule(self) -> str:
        """What an adapter output's rank is when neither rank nor energy is given."""
        if self.default_rank == "sum":
            return "exact (the inputs' ranks summed)"
        what = "the exact sum" if self.linear else "each module's dense result"
        return f"{what} truncated to the largest input rank"

    def semantics(self) -> dict[str, Any]:
        """The defaults that shape its output, as the merge stage's fingerprint records them (a change reruns it)."""
        return {"method": self.name, "weight": WEIGHT_DEFAULT, "rank": self.default_rank, "linear": self.linear,
                "normalize": self.normalize, "normalize_mergekit": self.normalize_mergekit}


METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    cite: str,
    options: tuple[str, ...],
    linear: bool,
    default_rank: Literal["sum", "largest"] | None = None,
    normalize: bool | None = None,
    normalize_mergekit: bool | None = None,
    mergekit: str | None = None,
    mergekit_mode: bool | None = None,
    adapters_only: bool = False,
    random: bool = False,
    of_weights: bool = False,
) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn`` as merge method ``name``; the function itself is returned unchanged (unit-testable).

    ``default_rank`` defaults to ``sum`` for linear methods (exact) and ``largest`` for the others (their dense
    result has no exact low rank); ``mergekit_mode`` defaults to whether a mergekit counterpart is named.
    """
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise ValueError(f"merge method '{name}': unknown option(s) {unknown}; known: {', '.join(OPTIONS)}")
    if ("normalize" in options) != (normalize is not None):
        raise ValueError(f"merge method '{name}': give normalize's default exactly when it reads normalize")

    def register(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise ValueError(f"merge method '{name}' is registered twice")
        METHODS[name] = MergeMethod(
            name=name, fn=fn, math=" ".join((fn.__doc__ or "").split()), cite=cite, options=options, linear=linear,
            default_rank=default_rank or ("sum" if linear else "largest"), normalize=normalize,
            normalize_mergekit=normalize_mergekit, mergekit=mergekit,
            mergekit_mode=mergekit is not None if mergekit_mode is None else mergekit_mode,
            adapters_only=adapters_only, random=random, of_weights=of_weights)
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; PluribusError naming the available ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise PluribusError(f"Unknown merge method '{name}'. Available: {', '.join(METHODS)}") from None


def users_of(option: str) -> list[str]:
    """The methods that read ``option``."""
    return [m.name for m in METHODS.values() if option in m.options]


def markdown_table() -> str:
    """The README's table of methods, from the registrations."""
    rows = ["| method | what it computes | follows | options (defaults) | adapter output without rank / energy |",
            "|---|---|---|---|---|"]
    for m in METHODS.values():
        math = m.math.replace("|", "\\|")  # a pipe inside a table cell, code spans included, is escaped (GFM)
        rows.append(f"| `{m.name}` | {math} | {m.cite} | {m.option_text()} | {m.rank_rule} |")
    return "\n".join(rows)


def merge_deltas(
    method: str,
    deltas: Sequence[torch.Tensor],
    params: MethodParams,
    generator: torch.Generator | None = None,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """Merge the task vectors of one tensor with the registered ``method``; returns the merged delta (work dtype).

    The fast path of :func:`composed_merge` (same steps, same result up to float rounding of the sums): TIES elects
    and merges expert by expert without stacking, so memory is the T deltas plus a few tensors of one expert's size.
    In mergekit's mode in half precision the order of roundings matters, so it runs the steps over the stack, op for
    op as mergekit does. ``deltas``: T tensors of one shape; with ``inplace=True`` (work-dtype inputs) they are
    overwritten to save memory. Raises PluribusError for an unknown or adapter-only method, an option the method
    cannot take, or a missing generator for a random method.
    """
    import torch

    m, params = _resolve(method, params)
    dtype = params.dtype or _math().work_dtype(deltas[0])
    ds = [d if inplace and d.dtype == dtype else d.to(dtype, copy=True) for d in deltas]
    return m.fn(ds, params, generator, params.mergekit and dtype in (torch.bfloat16, torch.float16))


def composed_merge(
    method: str, deltas: Sequence[torch.Tensor], params: MethodParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The registered method composed from its steps as the papers state them, over the stacked deltas ``[T, ...]``
    (trim to the density or DARE's drop and rescale, then for TIES the sign election and disjoint merge, else the
    weighted sum; times lambda): the reference that :func:`merge_deltas` is tested against (and, in mergekit's mode
    in half precision, the path it takes)."""
    m, params = _resolve(method, params)
    dtype = params.dtype or _math().work_dtype(deltas[0])
    return m.fn([d.to(dtype, copy=True) for d in deltas], params, generator, True)


def _resolve(method: str, params: MethodParams) -> tuple[MergeMethod, MethodParams]:
    """The registered method and ``params`` with normalize resolved to the method's default; refuses what the
    method cannot take over tensors."""
    m = get_method(method)
    if m.adapters_only:
        raise PluribusError(f"method '{method}' merges LoRA factors; over tensors use task_arithmetic, ties, ...")
    if params.mergekit and not m.mergekit_mode:
        raise PluribusError(f"method '{method}' has no mergekit counterpart; drop mergekit: true")
    if params.thresholds is not None and "trim" not in m.options:
        raise PluribusError(f"method '{method}' does not trim over the model (trim: global); use trim: tensor")
    normalize = m.normalize_default(params.mergekit) if params.normalize is None else params.normalize
    return m, dataclasses.replace(params, normalize=normalize)


def _math() -> Any:
    """merge/methods.py, imported on first use (it imports torch)."""
    from pluribus.merge import methods

    return methods


# ------------------------------------------------------------------------------------------ the methods


@merge_method("cat", cite="PEFT's `add_weighted_adapter(combination_type='cat')`", options=(), linear=True,
              adapters_only=True)
def cat(ds: list[torch.Tensor], p: MethodParams, generator: torch.Generator | None, stacked: bool) -> torch.Tensor:
    """``lambda sum_t w_t delta_t`` written exactly as stacked factors ``[c_1 B_1 | ... | c_T B_T] [A_1; ...; A_T]``
    (rank ``sum_t r_t``)."""
    return _math().weighted_sum(ds, p, stacked=stacked)


@merge_method("svd", cite="Eckart-Young; PEFT's `combination_type='svd'`", options=("rank", "energy"), linear=True,
              default_rank="largest", adapters_only=True)
def svd(ds: list[torch.Tensor], p: MethodParams, generator: torch.Generator | None, stacked: bool) -> torch.Tensor:
    """The best rank-k approximation of ``lambda sum_t w_t delta_t``, computed from the stacked factors."""
    return _math().weighted_sum(ds, p, stacked=stacked)


@merge_method("linear", cite="Model soups, Wortsman et al. 2022 (arXiv:2203.05482)",
              options=("rank", "energy", "normalize"), linear=True, normalize=True, mergekit="linear",
              of_weights=True)
def linear(ds: list[torch.Tensor], p: MethodParams, generator: torch.Generator | None, stacked: bool) -> torch.Tensor:
    """``sum_t w_t theta_t / sum_t w_t``, the weighted average (the plain weighted sum with ``normalize: false``)."""
    return _math().weighted_sum(ds, p, stacked=stacked)


@merge_method("task_arithmetic", cite="Task Arithmetic, Ilharco et al. 2023 (arXiv:2212.04089)",
              options=("rank", "energy", "normalize"), linear=True, normalize=False, mergekit="task_arithmetic")
def task_arithmetic(ds: list[torch.Tensor], p: MethodParams, generator: torch.Generator | None,
                    stacked: bool) -> torch.Tensor:
    """``lambda sum_t w_t delta_t``, the weighted sum of the task vectors (divided by ``sum_t w_t`` with
    ``normalize: true``)."""
    return _math().weighted_sum(ds, p, stacked=stacked)


@merge_method("magnitude", cite="magnitude pruning (Han et al. 2015), then task arithmetic",
              options=("rank", "energy", "density", "trim", "normalize"), linear=False, normalize=False,
              mergekit_mode=True)
def magnitude(ds: list[torch.Tensor], p: MethodParams, generator: torch.Generator | None,
              stacked: bool) -> torch.Tensor:
    """Keep the ``density`` largest-magnitude entries of each ``delta_t``, then ``lambda sum_t w_t delta_t``."""
    M = _math()
    M.trim_all(ds, p)
    return M.weighted_sum(ds, p, stacked=stacked)


@merge_method("ties", cite="TIES-Merging, Yadav et al. 2023 (arXiv:2306.01708)",
              options=("rank", "energy", "density", "trim", "normalize"), linear=False, normalize=True,
              mergekit="ties")
def ties(ds: list[torch.Tensor], p: MethodParams, generator: torch.Generator | None, stacked: bool) -> torch.Tensor:
    """Trim each ``delta_t`` to its ``density`` largest entries, elect the sign ``sgn(sum_t delta_t)`` per entry,
    then the weighted mean (sum without normalize) of the entries that agree, times lambda."""
    M = _math()
    M.trim_all(ds, p)
    return M.ties_merge(ds, p, stacked=stacked)


@merge_method("dare_linear", cite="DARE, Yu et al. 2024 (arXiv:2311.03099)", options=("rank", "energy", "drop",
              "normalize"), linear=False, normalize=False, mergekit="dare_linear", random=True)
def dare_linear(ds: list[torch.Tensor], p: MethodParams, generator: torch.Generator | None,
                stacked: bool) -> torch.Tensor:
    """Drop each entry of ``delta_t`` with probability ``drop``, rescale the rest by ``1 / (1 - drop)``, then
    ``lambda sum_t w_t delta_t``."""
    M = _math()
    return M.weighted_sum(M.dare_all(ds, p, generator, "dare_linear"), p, stacked=stacked)


@merge_method("dare_ties", cite="DARE (arXiv:2311.03099), then TIES's sign election", options=("rank", "energy",
              "drop", "normalize"), linear=False, normalize=True, normalize_mergekit=False, mergekit="dare_ties",
              random=True)
def dare_ties(ds: list[torch.Tensor], p: MethodParams, generator: torch.Generator | None,
              stacked: bool) -> torch.Tensor:
    """DARE's drop and rescale of each ``delta_t``, then TIES's sign election and disjoint merge."""
    M = _math()
    return M.ties_merge(M.dare_all(ds, p, generator, "dare_ties"), p, stacked=stacked)


@merge_method("pcb", cite="PCB-Merging, Du et al. 2024 (arXiv:2410.02396)", options=("rank", "energy", "density"),
              linear=False)
def pcb(ds: list[torch.Tensor], p: MethodParams, generator: torch.Generator | None, stacked: bool) -> torch.Tensor:
    """Balance each entry by intra- and inter-task scores, keep the ``density`` best per task, then the
    score-weighted mean ``sum_t beta_t w_t delta_t / sum_t beta_t``, times lambda (see methods.pcb)."""
    return _math().pcb(ds, p.density or 1.0, p.weights, p.lam)
