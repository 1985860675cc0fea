"""Streaming full-model merges: one tensor at a time from every input's safetensors shards, straight to disk.

Memory holds the T+1 input tensors of the current name plus the merged one; output shards are planned from the
base's headers (names, shapes, dtypes are known before any data is read), so each tensor's bytes are written
at their place as soon as they are merged and no shard is ever buffered. Everything goes to a temporary folder
beside the output that is renamed at the end (pluribus.io.atomic_dir): a killed merge leaves no output folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from pluribus.errors import PluribusError
from pluribus.merge import methods as M
from pluribus.merge.checkpoint import CODES, Checkpoint, check_same_weights, local_model, read_config
from pluribus.merge.registry import get_method, merge_deltas
from pluribus.merge.spec import MergeSpec

# what a merged model keeps from its base beside the weights: the tokenizer and the generation config
COMPANION_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


def parse_size(text: str | int) -> int:
    """'500MB' / '2GB' / '1.5GiB' / 1024 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise PluribusError(f"shard_size '{text}' is not a size; write e.g. 500MB or 2GB")
    base = 1024 if (m.group(3) or "").lower() == "ib" else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


# ------------------------------------------------------------------------------------------- writing


class ShardedWriter:
    """Writes planned tensors, in plan order, into safetensors shards of at most ``max_bytes`` (+ index)."""

    def __init__(self, folder: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int):
        self.folder = folder
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = _nbytes(entry[1], entry[2])
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        self.shards = shards
        n = len(shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total = sum(_nbytes(d, s) for _, d, s in plan)
        self._queue: Iterator[tuple[int, tuple[str, torch.dtype, tuple[int, ...]]]] = (
            (i, e) for i, shard in enumerate(shards) for e in shard
        )
        self._file: BinaryIO | None = None
        self._shard = -1

    def _open(self, i: int) -> None:
        if self._file:
            self._close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in self.shards[i]:
            nbytes = _nbytes(dtype, shape)
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns data to 8 bytes
        self._file = open(self.folder / self.names[i], "wb")  # noqa: SIM115 (closed in _close)
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = i

    def _close(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        i, (planned, dtype, shape) = next(self._queue)
        if planned != name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise PluribusError(f"internal: wrote {name} {tensor.dtype} {tuple(tensor.shape)}, planned {planned} {dtype} {shape}")
        if i != self._shard:
            self._open(i)
        assert self._file is not None
        if tensor.numel():
            self._file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def finish(self) -> None:
        if self._file:
            self._close()
        if len(self.names) > 1:
            weight_map = {name: self.names[i] for i, shard in enumerate(self.shards) for name, _, _ in shard}
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------- merge


class Expert:
    """One input of a full merge: a checkpoint, optionally with a LoRA adapter on top (``base + adapter``).

    When the checkpoint is the base itself, its task vector on an adapted module is just ``s B A``: the
    merge never forms the adapted weights (the ``base + adapter`` input costs no extra read of the base).
    """

    def __init__(self, ckpt: Checkpoint | None, adapter: Any | None, label: str):
        self.ckpt, self.adapter, self.label = ckpt, adapter, label

    def delta(self, name: str, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.adapter is not None and name in self.adapter.full:
            d = self.adapter.full[name].to(dtype) - base  # the adapter replaces the checkpoint's tensor
        elif self.ckpt is not None:
            t = self.ckpt.get(name)
            # bf16 - f32 promotes inside one kernel: no separate up-cast pass
            d = torch.sub(t, base) if t.dtype == base.dtype or t.itemsize < base.itemsize else t.to(dtype) - base
            M.check_finite(d, f"{self.label}:{name}")  # finite base + finite delta <=> finite input (a fast sum)
        else:
            d = torch.zeros_like(base)
        return self._add_adapter(d, name, dtype)

    def full(self, name: str, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The expert's own tensor (read as is: no base + (x - base) round trip)."""
        if self.adapter is not None and name in self.adapter.full:
            t = self.adapter.full[name].to(dtype)
        else:
            t = base if self.ckpt is None else self.ckpt.get(name).to(dtype)
            if self.ckpt is not None:
                M.check_finite(t, f"{self.label}:{name}")
        return self._add_adapter(t, name, dtype)

    def _add_adapter(self, t: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``t`` plus what the adapter's LoRA adds to tensor ``name``: ``s B A`` to a weight, ``s b_B`` to a bias."""
        m = None if self.adapter is None else self.adapter.modules.get(name.rsplit(".", 1)[0])
        if m is not None and name.endswith(".weight"):
            t = t + m.delta(dtype)
        elif m is not None and name.endswith(".bias") and m.bias is not None:
            t = t + m.bias.to(dtype) * m.scaling
        return t


def _check_shapes(base: Checkpoint, experts: list[Expert]) -> None:
    for e in experts:
        if e.ckpt is not None and e.ckpt is not base:
            missing = [n for n in base.tensors if n not in e.ckpt.tensors]
            extra = [n for n in e.ckpt.tensors if n not in base.tensors]
            if missing or extra:
                what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the base lacks"
                raise PluribusError(
                    f"model '{e.label}' {what} ({len(missing)} missing, {len(extra)} extra vs base '{base.folder}'); "
                    "all models must share the base's architecture"
                )
            for n, info in base.tensors.items():
                other = e.ckpt.tensors[n].shape
                if other != info.shape:
                    raise PluribusError(
                        f"tensor {n} is {info.shape} in base '{base.folder}' but {other} in '{e.label}'; "
                        "all models must share the base's shapes"
                    )
        if e.adapter is not None:
            check_adapter_fits(base, e.adapter)


def check_adapter_fits(base: Checkpoint, adapter: Any) -> None:
    """Refuse an adapter (``adapters.Adapter``) whose modules the base lacks or has in other shapes."""
    # the recorded base name alone is no proof (local copies, hub ids): it only explains a mismatch
    recorded = f" (its adapter_config.json records base '{adapter.base}')" if adapter.base else ""
    for module, m in adapter.modules.items():
        key = f"{module}.weight"
        if key not in base.tensors:
            raise PluribusError(f"adapter '{adapter.path}' adapts {module}, which base '{base.folder}' lacks{recorded}; "
                                "the adapter was trained on another base")
        shape = (m.B.shape[0], m.A.shape[1])
        if base.tensors[key].shape != shape:
            raise PluribusError(
                f"adapter '{adapter.path}' module {module} is {shape} but base '{base.folder}' has "
                f"{base.tensors[key].shape}; the adapter was trained on another base{recorded}"
            )
    for name in sorted(adapter.other_names):
        shape = tuple(adapter.full[name].shape) if name in adapter.full else (adapter.modules[name[:-5]].B.shape[0],)
        if name not in base.tensors and name not in adapter.full:  # a lora_B bias on a layer without a bias
            raise PluribusError(f"adapter '{adapter.path}' trains a lora_B bias on {name.removesuffix('.bias')}, whose "
                                f"layer has no bias in base '{base.folder}', so no model of that architecture holds "
                                "it; merge it into an adapter instead (output: adapter)")
        if name not in base.tensors or base.tensors[name].shape != shape:
            found = f"has it as {base.tensors[name].shape}" if name in base.tensors else "lacks it"
            raise PluribusError(f"adapter '{adapter.path}' sets {name} {shape}, but base '{base.folder}' {found}; the "
                                f"adapter was trained on another base{recorded}")


def merge_models(
    spec: MergeSpec,
    folder: Path,
    progress: Callable[[int, int, str], None] | None = None,
    tensor_delta: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
    folded: Sequence[Any] = (),
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Stream the merge of ``spec`` into ``folder`` (an empty temporary folder); returns summary figures.

    ``tensor_delta(name, base)`` replaces the method for tensors it returns a delta for (adapter folding);
    ``folded`` are the adapters it folds, checked against the base's shapes before anything is written.
    ``device`` (``pluribus.device``; None: the CPU): where folding adds each delta to its base tensor. Merges by a
    method stay on the CPU, where their seeded draws (DARE) are the same on every machine.
    Raises PluribusError for missing/corrupt files, mismatched tensors (naming both models) and NaN/Inf.
    """
    # 1. open and check every input before anything is written
    if not spec.base:
        raise PluribusError(f"method '{spec.method}' over models needs `base` (the model the experts were tuned from)")
    base_dir = local_model(spec.base)
    read_config(base_dir)  # copied beside the merged weights at the end: refuse a broken one before merging
    base = Checkpoint(base_dir)
    experts = _open_experts(spec, base, base_dir) if tensor_delta is None else []
    _check_folded(spec, folded, base, base_dir)

    # 2. stream: each tensor of the base merged (or copied), stored in the output dtype, written
    fixed = None if spec.dtype == "auto" else getattr(torch, spec.dtype)
    out_dtype = getattr(torch, spec.out_dtype) if spec.out_dtype else None
    plan = [(n, (out_dtype or i.dtype) if i.dtype.is_floating_point else i.dtype, i.shape)
            for n, i in base.tensors.items()]
    writer = ShardedWriter(folder, plan, parse_size(spec.shard_size))
    params = _params(spec, base, experts, fixed or torch.float32) if tensor_delta is None else None
    gen = torch.Generator().manual_seed(spec.seed)
    # the stored dtype rounds each merged tensor; against the change the merge made (not the weight, which would
    # hide it), that rounding is what the output loses: a small delta folded into bfloat16 can lose much of itself
    lost = changed = 0.0
    for k, (name, dtype, _) in enumerate(plan):
        b = base.get(name)
        if not b.is_floating_point():
            stored = _unmerged_integer(name, b, experts)
        else:
            work = fixed or (b.dtype if spec.mergekit else M.work_dtype(b))  # mergekit: the input dtype
            bw = b.to(device=device if tensor_delta is not None else None, dtype=work)
            M.check_finite(bw, f"{base.folder}:{name}")
            merged = _merge_tensor(spec, name, bw, experts, params, gen, tensor_delta)
            stored = merged.to(dtype)
            if merged is not bw:
                # one temporary of the tensor's size each (a float64 copy would triple a large merge's peak memory)
                changed += float((merged - bw).pow_(2).sum(dtype=torch.float64))
                lost += float((stored.to(merged.dtype) - merged).pow_(2).sum(dtype=torch.float64))
        writer.write(name, stored.cpu())
        if progress:
            progress(k + 1, len(plan), name)
    writer.finish()
    base.close()
    for e in experts:
        if e.ckpt is not None:
            e.ckpt.close()
    return {"tensors": len(plan), "bytes": writer.total, "shards": len(writer.names),
            "storage_error": math.sqrt(lost / changed) if changed else 0.0}


def _open_experts(spec: MergeSpec, base: Checkpoint, base_dir: Path) -> list[Expert]:
    """The inputs of ``spec`` as experts (the base itself as an input stores no delta), each adapter checked
    against its model where ``spec.check_base``, and every shape against the base's."""
    from pluribus.adapter import check_adapter
    from pluribus.merge.adapters import is_adapter, load_adapter

    experts: list[Expert] = []
    for inp in spec.inputs:
        adapter = load_adapter(inp.adapter) if inp.adapter else None
        if adapter is None and is_adapter(inp.path):
            raise PluribusError(f"input '{inp.path}' is an adapter; give it as `adapter:` with `path:` its base model")
        # the base itself as an input (alone or under an adapter) contributes no stored delta
        path = local_model(inp.path)
        if adapter is not None and spec.check_base:
            check_adapter(adapter.path, path)  # shapes alone pass an adapter of a same-sized other model
            check_same_weights(adapter, path)
        same = path.resolve() == base_dir.resolve()
        experts.append(Expert(None if same else Checkpoint(path), adapter, inp.label))
    _check_shapes(base, experts)
    return experts


def _check_folded(spec: MergeSpec, folded: Sequence[Any], base: Checkpoint, base_dir: Path) -> None:
    """Each adapter to fold was trained on this base (where ``spec.check_base``) and fits its shapes."""
    from pluribus.adapter import check_adapter

    for adapter in folded:
        if spec.check_base:
            check_adapter(adapter.path, base_dir)
            check_same_weights(adapter, base_dir)
        check_adapter_fits(base, adapter)


def _unmerged_integer(name: str, b: torch.Tensor, experts: list[Expert]) -> torch.Tensor:
    """An integer tensor (a buffer) is not merged but kept as the base's: an expert that changed it would be
    dropped without a word, so that is an error."""
    other = next((e for e in experts if e.ckpt is not None and not torch.equal(e.ckpt.get(name), b)), None)
    if other is not None:
        raise PluribusError(f"tensor {name} ({b.dtype}) of '{other.label}' differs from the base's; integer "
                            "tensors cannot be merged: give experts that keep the base's")
    return b


def _merge_tensor(spec: MergeSpec, name: str, bw: torch.Tensor, experts: list[Expert], params: M.MethodParams | None,
                  gen: torch.Generator, tensor_delta: Callable[[str, torch.Tensor], torch.Tensor | None] | None
                  ) -> torch.Tensor:
    """One merged tensor from its base ``bw`` (in the work dtype): the folded delta where ``tensor_delta`` gives
    one, else the method over the experts; ``bw`` itself where nothing changes it."""
    work = bw.dtype
    if tensor_delta is not None:
        d = tensor_delta(name, bw)
        return bw if d is None else bw + d.to(device=bw.device, dtype=work)
    if get_method(spec.method).of_weights:  # a soup of the weights themselves (linear)
        return M.linear([e.full(name, bw, work) for e in experts], params.weights,
                        True if spec.normalize is None else spec.normalize)
    delta = merge_deltas(spec.method, [e.delta(name, bw, work) for e in experts],
                         dataclasses.replace(params, dtype=work), gen, inplace=True)
    return delta.add_(bw)


def _params(spec: MergeSpec, base: Checkpoint, experts: list[Expert], work: torch.dtype) -> M.MethodParams:
    from pluribus.merge.adapters import method_params

    params = method_params(spec)
    if "trim" in get_method(spec.method).options and spec.trim == "global":
        floats = [n for n, i in base.tensors.items() if i.dtype.is_floating_point]

        def chunks(e: Expert) -> Iterator[torch.Tensor]:
            for n in floats:
                yield e.delta(n, base.get(n).to(work), work)

        thresholds = tuple(
            M.global_threshold(lambda e=e: chunks(e), params.density[t]) for t, e in enumerate(experts)
        )
        params = dataclasses.replace(params, thresholds=thresholds)
    return params


def copy_companions(source: Path, tokenizer_source: Path | None, folder: Path, out_dtype: str | None) -> None:
    """Copy config.json (dtype updated), generation config and tokenizer files next to the merged weights."""
    data = read_config(source)
    if data is not None:
        if out_dtype:
            for key in ("torch_dtype", "dtype"):
                if key in data:
                    data[key] = out_dtype
        (folder / "config.json").write_text(json.dumps(data, indent=2))
    for src in [source] if tokenizer_source in (None, source) else [source, tokenizer_source]:
        for name in COMPANION_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, folder / name)
