"""Merging experts: tensor math, rank-heterogeneous adapter merges, streaming full-model merges, LoRA extraction.

``run_merge(spec, out)`` is the stage: it reads the inputs, merges (adapters in low-rank space, models
tensor by tensor, anything else through mergekit), and writes ``out`` atomically with the recipe, a report
and a model card beside the weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pluribus.errors import OutputExistsError, PluribusError
from pluribus.merge.config import load_merge_config, parse_merge_config
from pluribus.merge.mergekit import mergekit_local_paths
from pluribus.merge.registry import get_method
from pluribus.merge.spec import MergeInput, MergeSpec
from pluribus.modelref import ModelRef

__all__ = [
    "MergeInput", "MergeSpec", "MergeSummary", "load_merge_config", "merge_record", "parse_merge_config", "run_merge",
]

@dataclass
class MergeSummary:
    """What a merge did: the CLI prints ``lines()``; ``merge_report.json`` holds all of it."""

    method: str
    kind: str  # adapters -> adapter | adapters -> model | models -> model | mergekit
    out: str
    inputs: list[str]
    ranks_in: list[list[int]] = field(default_factory=list)
    ranks_out: list[int] = field(default_factory=list)
    error: float | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # what the output's floating tensors are stored in, when pluribus wrote them
    others: int = 0  # tensors merged besides the LoRA factors (biases, modules_to_save)
    ran_on: str = "cpu"  # where the merge computed (pluribus.device): folding on the asked device, the rest on the CPU
    note: str | None = None  # what the error measures for an adapter output: exact, or truncated to what and why

    def lines(self) -> list[str]:
        out = [f"method {self.method} ({self.kind}), {len(self.inputs)} inputs -> {self.out}"]
        if self.ranks_in:
            out.append("ranks in: " + "; ".join(f"{'/'.join(map(str, r))}" for r in self.ranks_in))
        if self.ranks_out:
            lo, hi = min(self.ranks_out), max(self.ranks_out)
            out.append(f"ranks out: {lo}" + (f"..{hi} (per module, rank_pattern)" if hi != lo else ""))
        if self.others:
            out.append(f"besides the LoRA factors: {self.others} tensor(s) (biases, modules_to_save), merged at full rank")
        if self.error is not None:
            out.append(f"relative error vs the exact merge: {self.error:.3e}" + (
                f" (rounding to the stored dtype loses {self.error:.0%} of the change; out_dtype: float32 keeps it)"
                if self.error > 0.01 and self.kind.endswith("-> model") else f" ({self.note})" if self.note else ""))
        if self.dtype:
            out.append(f"stored as {self.dtype}")
        if self.kind != "mergekit":
            out.append(f"ran on {self.ran_on}")
        out.append(f"time: {self.seconds:.1f} s")
        return out


def merge_record(folder: Path) -> dict[str, Any] | None:
    """What a merge output says of itself (its merge_report.json): method, relative error vs the exact merge and
    what that error measures (``note``), output ranks; None for a folder no pluribus merge wrote."""
    path = Path(folder) / "merge_report.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {k: data.get(k) for k in ("method", "kind", "error", "note", "ranks_out")}


def _progress(enabled: bool) -> Any:
    """The merge's transient bar on the terminal (stderr); none when ``enabled`` is off (``--no-progress``) or
    stderr is no terminal (a log)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, console=Console(stderr=True), disable=not (enabled and sys.stderr.isatty()))


def _card(spec: MergeSpec, summary: MergeSummary, adapter: bool) -> str:
    """The merge folder's README: Hub-valid metadata (the base by Hub id, never a local path), what was merged
    with every input named without its local path, and the note that ``pluribus export`` publishes it."""
    from pluribus.hub import local_card
    from pluribus.public import public_model_name, scrub

    body = ["", *(f"- {line}" for line in summary.lines()[1:-1]), "", "Inputs:", "",
            *(f"- `{public_model_name(i)}`" for i in summary.inputs), "", "## Recipe", "", "```yaml",
            yaml.safe_dump(scrub(yaml.safe_load(spec.to_yaml())), sort_keys=False).rstrip(), "```"]
    return local_card("adapter" if adapter else "model", spec.base, f"Merged with pluribus ({spec.method})",
                      "adapter" if adapter else "merge", tags=["merge", spec.method], body=body,
                      folder=Path(summary.out).name)


def _kind(spec: MergeSpec) -> str:
    from pluribus.merge.adapters import is_adapter

    for i in spec.inputs:
        # adapters are read from local folders only; a model may also be an alias or a hub id
        for path in (i.path, i.adapter):
            if path is not None and (ModelRef.parse(path).form == "missing" or (path == i.adapter and not Path(path).exists())):
                raise PluribusError(f"input '{path}' does not exist; check the path in the merge config")
    flags = [is_adapter(i.path) and i.adapter is None for i in spec.inputs]
    if all(flags):
        return "adapters"
    for path in (i.path for i, f in zip(spec.inputs, flags, strict=True) if not f):
        folder = Path(path)
        # a folder that is no model either was meant as an adapter (or holds adapter weights)
        meant = any(flags) or (folder / "adapter_model.safetensors").is_file()
        if folder.is_dir() and not (folder / "config.json").is_file() and meant:
            raise PluribusError(f"input '{path}' has no adapter_config.json (not a PEFT adapter folder)")
    if any(flags):
        odd = next(i.path for i, f in zip(spec.inputs, flags, strict=True) if f)
        raise PluribusError(
            f"input '{odd}' is an adapter but others are models; give it as `adapter: {odd}` with `path:` its base"
        )
    return "models"


def folds(spec: MergeSpec) -> bool:
    """Whether ``spec`` folds adapters into a model: the one merge that computes on the policy's device."""
    return spec.method != "mergekit" and spec.output == "model" and _kind(spec) == "adapters"


def run_merge(
    spec: MergeSpec, out: str | Path, *, overwrite: bool = False, progress: bool = True,
    device: str | None = None,
) -> MergeSummary:
    """Run one merge into ``out`` (refused if it exists unless ``overwrite``); returns the summary.

    ``device`` (a setting, ``pluribus.device``; None: auto): where folding adapters into a model adds each
    delta; every other merge streams on the CPU (its seeded draws the same on every machine) and says so.
    Raises PluribusError for bad inputs before anything is written; ``out`` appears only when complete.
    ``progress``: a bar on the terminal while it merges (off: none, ``--no-progress``).
    """
    from pluribus.io import atomic_dir

    out = Path(out)
    start = time.perf_counter()
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    if out.exists():
        _refuse_replacing_an_input(spec, out)
    if spec.method == "mergekit":
        return _run_mergekit(spec, out, overwrite, start)
    kind = _kind(spec)
    _refuse_what_has_no_effect(spec, kind)
    summary = MergeSummary(spec.method, "", str(out), [i.label for i in spec.inputs])
    fold_device = None
    if kind == "adapters" and spec.output == "model":
        from pluribus.device import resolve

        fold_device = resolve(device)
        summary.ran_on = f"{fold_device} (folding)"
    with atomic_dir(out, overwrite=overwrite) as tmp, _progress(progress) as bar:
        if kind == "adapters":
            _merge_adapters(spec, tmp, summary, bar, fold_device)
        else:
            _merge_full_models(spec, tmp, summary, bar)
        summary.seconds = time.perf_counter() - start
        (tmp / "merge.yaml").write_text(spec.to_yaml())
        (tmp / "merge_report.json").write_text(json.dumps(asdict(summary), indent=2))
        (tmp / "README.md").write_text(_card(spec, summary, adapter=summary.kind.endswith("adapter")))
    return summary


def _refuse_what_has_no_effect(spec: MergeSpec, kind: str) -> None:
    """A method, output or option that this merge (of ``kind`` inputs: models or adapters) cannot honour is an
    error, never silently ignored."""
    if kind == "models" and get_method(spec.method).adapters_only:
        raise PluribusError(f"method '{spec.method}' merges adapters; for models use task_arithmetic, ties, dare_ties ...")
    if kind == "models" and spec.output == "adapter":
        raise PluribusError("output 'adapter' needs adapter inputs; to turn a model into a LoRA use extraction")
    if kind == "adapters" and spec.output != "model":
        unused = {"tokenizer_source": spec.tokenizer_source is not None, "dtype": spec.dtype != "float32",
                  "shard_size": spec.shard_size != "1GB"}
        name = next((k for k, v in unused.items() if v), None)
        if name is not None:  # an adapter output is merged in float32 (float64 decompositions), one file, no tokenizer
            raise PluribusError(f"{name} has no effect on an adapter output; remove it (or fold into the base with "
                                "output: model)")
    if (kind == "models" or spec.output == "model") and (spec.rank is not None or spec.energy is not None):
        raise PluribusError("rank and energy shape an adapter output, but this merge writes a model; remove them "
                            "(or write an adapter with output: adapter)")


def _merge_full_models(spec: MergeSpec, tmp: Path, summary: MergeSummary, bar: Any) -> None:
    """Merge full models tensor by tensor into ``tmp`` with the base's config and tokenizer files beside them."""
    from pluribus.merge.checkpoint import local_model
    from pluribus.merge.full import copy_companions, merge_models

    summary.kind = "models -> model"
    summary.dtype = spec.out_dtype or "the base's dtype"
    task = bar.add_task("merging tensors", total=None)
    summary.details = merge_models(spec, tmp, lambda k, n, _: bar.update(task, completed=k, total=n))
    summary.error = summary.details["storage_error"]
    copy_companions(local_model(spec.base), local_model(spec.tokenizer_source) if spec.tokenizer_source else None,
                    tmp, spec.out_dtype)


def _input_paths(spec: MergeSpec) -> list[str]:
    """Every local path a merge reads: inputs, their adapters, the base, the tokenizer source, mergekit's models."""
    refs = [r for i in spec.inputs for r in (i.path, i.adapter) if r] + [r for r in (spec.base, spec.tokenizer_source) if r]
    data = spec.mergekit_yaml or {}
    models = list(data.get("models") or [])
    for sl in data.get("slices") or []:
        models += list(sl.get("sources") or []) if isinstance(sl, dict) else []
    for ref in [data.get("base_model"), *(m.get("model") for m in models if isinstance(m, dict))]:
        if isinstance(ref, str):
            model = ModelRef.parse(ref, adapter=True)  # mergekit's `model+lora`
            refs += [model.text, *([model.adapter] if model.adapter else [])]
    return refs


def _refuse_replacing_an_input(spec: MergeSpec, out: Path) -> None:
    """--overwrite replaces ``out`` at the end: refuse an ``out`` that is an input or holds one (it would be deleted)."""
    target = out.resolve()
    for ref in _input_paths(spec):
        path = Path(ref).expanduser()
        if path.exists() and (path.resolve() == target or target in path.resolve().parents):
            raise PluribusError(f"output '{out}' is the input '{ref}' or holds it, and --overwrite would delete it; "
                                "write the merge to another folder")


def _merge_adapters(spec: MergeSpec, tmp: Path, summary: MergeSummary, bar: Any, device: Any = None) -> None:
    from pluribus.merge.adapters import AdapterPlan, load_adapter, merge_adapters, save_adapter

    adapters = [load_adapter(i.path) for i in spec.inputs]
    summary.ranks_in = [a.ranks for a in adapters]
    if spec.output == "model":
        if not spec.base:
            raise PluribusError("folding adapters into a model (output: model) needs `base`, the adapters' base model")
        from pluribus.merge.checkpoint import local_model
        from pluribus.merge.full import copy_companions, merge_models

        plan = AdapterPlan(spec, adapters)
        summary.others = len(plan.others)
        summary.kind = "adapters -> model"
        summary.dtype = spec.out_dtype or "the base's dtype"
        task = bar.add_task("folding into the base", total=None)

        others = set(plan.others)

        def delta(name: str, base: Any) -> Any:
            module = name.removesuffix(".weight")
            if name in others:
                return plan.other(name)
            return plan.dense(module, base.device) if name.endswith(".weight") and module in plan.shapes else None

        if not plan.low_rank and device is not None and device.type != "cpu":
            summary.ran_on += f"; {spec.method}'s deltas on the cpu"  # its seeded draws, as on every machine

        summary.details = merge_models(spec, tmp, lambda k, n, _: bar.update(task, completed=k, total=n), delta,
                                       folded=adapters, device=device)
        summary.error = summary.details["storage_error"]  # folding is exact up to the stored dtype's rounding
        copy_companions(local_model(spec.base), local_model(spec.tokenizer_source) if spec.tokenizer_source else None,
                        tmp, spec.out_dtype)
        return
    summary.kind = "adapters -> adapter"
    n_modules = len({m for a in adapters for m in a.modules})
    task = bar.add_task("merging modules", total=n_modules)
    merged = merge_adapters(spec, adapters, lambda _: bar.advance(task))
    save_adapter(tmp, merged, adapters[0].config)
    summary.dtype = spec.out_dtype or "float32"
    summary.note = _exactness(spec, max(max(a.ranks) for a in adapters))
    summary.ranks_out = sorted(set(merged.ranks.values()))
    summary.error = merged.total_error
    summary.others = len(merged.others)
    summary.details = {"module_errors": merged.errors, "module_ranks": merged.ranks}


def _exactness(spec: MergeSpec, largest: int) -> str:
    """What an adapter output's relative error is measured against, and why it is not exact where it is not."""
    method = get_method(spec.method)
    asked = f"rank {spec.rank}" if spec.rank else f"energy {spec.energy}" if spec.energy else None
    if method.linear and method.default_rank == "sum" and asked is None:
        return f"exact: the inputs' ranks summed; what remains is {spec.out_dtype or 'float32'} storage"
    if method.linear:
        return (f"the exact merge's best approximation at {asked}, as asked" if asked else
                f"the exact merge's best approximation at the largest input rank, {largest}: {method.name}'s default")
    return (f"{method.name} merges each module's dense delta; truncated to "
            + (f"{asked}, as asked" if asked else f"the largest input rank, {largest}, by default: set rank or energy, "
               "or fold it exactly into the base with output: model"))


@contextlib.contextmanager
def _config_dir(tmp: Path) -> Iterator[Path]:
    """A folder for mergekit's config, named like the output's temporary folder (host and pid) beside it, so that
    when this process is killed the next writer of the same output removes it (io.remove_stale_temps)."""
    stem = tmp.name.removesuffix(".tmp").rsplit(".", 1)[0]  # .NAME.HOST-PID, less mkdtemp's random part
    folder = Path(tempfile.mkdtemp(prefix=stem + ".", suffix=".tmp", dir=tmp.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _die_with_parent() -> None:
    """In the mergekit child before exec: the kernel sends it SIGKILL when pluribus dies, even by SIGKILL (which
    no handler of ours can see); without it mergekit-yaml runs on, re-parented, writing into a removed folder."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _run_mergekit(spec: MergeSpec, out: Path, overwrite: bool, start: float) -> MergeSummary:
    """Hand a mergekit config pluribus does not implement to ``mergekit-yaml`` (same atomic output rules)."""
    from pluribus.io import atomic_dir

    exe = Path(sys.executable).with_name("mergekit-yaml")
    if not exe.exists():
        found = shutil.which("mergekit-yaml")
        if not found:
            raise PluribusError("this config needs mergekit (a method pluribus does not implement): "
                               "pip install 'pluribus[mergekit]'")
        exe = Path(found)
    data = mergekit_local_paths(spec.mergekit_yaml or {})
    with atomic_dir(out, overwrite=overwrite) as tmp, _config_dir(tmp) as cfg_dir:
        cfg = cfg_dir / "mergekit.yaml"
        cfg.write_text(yaml.safe_dump(data, sort_keys=False))
        # pluribus's seed is mergekit's: the random methods handed to it (della, breadcrumbs ...) draw from it
        res = subprocess.run([str(exe), str(cfg), str(tmp), "--random-seed", str(spec.seed)],
                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                             preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise PluribusError(f"mergekit failed on method '{data.get('merge_method')}': {tail[0]}")
        summary = MergeSummary(str(data.get("merge_method")), "mergekit", str(out),
                               [str(m.get("model")) for m in data.get("models", []) if isinstance(m, dict)])
        summary.seconds = time.perf_counter() - start
        (tmp / "merge.yaml").write_text(spec.to_yaml())
        (tmp / "merge_report.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary
