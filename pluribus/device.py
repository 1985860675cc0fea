"""Where models run: one policy turning a device setting (auto, cpu, cuda, cuda:N) into a torch device and dtype.

Every model pluribus loads goes through it (DESIGN.md, "Engines past one process"). A setting is the recipe's
``device`` (CLI ``--device``), or a part's own: an agent's or the judge's ``device``, ``build.completer.device``
(Monte-Carlo rollouts), ``train.rl.prm_device`` (the PRM that scores RL's samples; default: the policy's
device), ``eval.device`` (eval's single-agent systems). The first one given wins (``pick``):

- ``auto``: the accelerator where torch sees one (``cuda``), else the CPU;
- ``cpu``, ``cuda`` (the current CUDA device), ``cuda:N``: as named; one that this machine lacks is refused
  (a PluribusError, exit 2), never replaced by another.

dtype: bf16 where the device computes it natively (a CUDA GPU of compute capability 8 or more; a CPU with
AVX512-BF16/AMX, which oneDNN reports), float32 where it does not; an explicit float16 or float32 is kept.
What a stage ran on (``where``) goes into its record and summary.

Training is placed by transformers' Trainer (accelerate), not here: ``training_device`` checks the setting
and ``pluribus.distill.loop.training_arguments`` tells the Trainer (``use_cpu``), so nothing forces the CPU.
Folding adapters into a model and LoRA extraction compute on the resolved device; merges by a method stream
on the CPU (their seeded draws the same on every machine). Where a part runs is left out of every hash that
keys a store or a stage's freshness (``config.without_engine_settings``): the records say it instead.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

from pluribus.errors import PluribusError

logger = logging.getLogger("pluribus.device")

FORMS = "auto, cpu, cuda or cuda:N"
_SETTING = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_setting(value: str) -> str:
    """A device setting as written, or a ValueError naming the forms allowed (for the recipe's validators)."""
    if not isinstance(value, str) or not _SETTING.fullmatch(value.strip()):
        raise ValueError(f"'{value}' is not a device; use {FORMS}")
    return value.strip()


def pick(*settings: str | None) -> str:
    """The first setting that is given (a part's own before the recipe's), else ``auto``."""
    return next((s for s in settings if s is not None), "auto")


def resolve(setting: str | None = None) -> Any:
    """The ``torch.device`` a setting names on this machine; a PluribusError when it has no such device."""
    import torch

    setting = "auto" if setting is None else str(setting).strip()
    if not _SETTING.fullmatch(setting):
        raise PluribusError(f"device '{setting}' is not a device; use {FORMS}")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PluribusError(f"device '{setting}' was asked for, but torch sees no CUDA GPU on this machine "
                            f"(torch {torch.__version__}); set device: cpu or auto (or --device cpu)")
    index = int(setting.split(":")[1]) if ":" in setting else None
    if index is not None and index >= torch.cuda.device_count():
        raise PluribusError(f"device '{setting}' was asked for, but this machine has {torch.cuda.device_count()} "
                            f"CUDA GPU(s) (cuda:0..cuda:{torch.cuda.device_count() - 1}); name one of them")
    return torch.device(setting)


@functools.cache
def _cpu_bf16() -> bool:
    import torch

    try:  # oneDNN's check: AVX512-BF16 / AMX, where bf16 matmuls run natively
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def supports_bf16(device: Any) -> bool:
    """Whether ``device`` computes bf16 natively (not emulated): the policy's choice between bf16 and float32."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return _cpu_bf16()
    return True  # meta (shapes only) and other accelerators torch runs bf16 on


def dtype_for(device: Any, asked: str | Any = "bfloat16") -> Any:
    """The dtype a model runs in on ``device``: ``asked`` (a name, a torch.dtype, or ``auto``), with bf16 (asked
    or auto) falling back to float32 where the device lacks it (logged, and the record says so)."""
    import torch

    name = asked if isinstance(asked, str) else str(asked).removeprefix("torch.")
    if name not in ("auto", "bfloat16"):
        return getattr(torch, name)
    if supports_bf16(device):
        return torch.bfloat16
    if name == "bfloat16":
        logger.warning("%s does not compute bf16 natively: running in float32 (the record says so)", device)
    return torch.float32


def place(model: Any, device: Any) -> Any:
    """Move a loaded model to the policy's ``device`` (the one place a model is moved); returns it."""
    return model.to(device)


def where(model: Any) -> dict[str, str]:
    """Where a model is: ``{"device": "cuda:0", "dtype": "bfloat16"}`` from its first floating-point parameter
    (a 4-bit QLoRA base stores its weights as bytes; its embeddings and adapter say the compute dtype)."""
    params = list(model.parameters())
    p = next((q for q in params if q.is_floating_point()), params[0])
    return {"device": str(p.device), "dtype": str(p.dtype).removeprefix("torch.")}


def training_device(setting: str | None, *, processes: int = 1) -> Any:
    """The device a training's Trainer is told to use; ``cuda:N`` beyond cuda:0 in one process is refused
    (transformers' Trainer places a one-process training on cuda:0), and so is any index in several processes
    (each trains on the GPU of its LOCAL_RANK)."""
    device = resolve(setting)
    if device.type == "cuda" and device.index:
        if processes > 1:
            raise PluribusError(f"device '{setting}' names one GPU, but training runs in {processes} processes, "
                                "each on the GPU of its rank; set device: cuda (or auto)")
        raise PluribusError(f"device '{setting}': transformers' Trainer trains one process on cuda:0; run with "
                            f"CUDA_VISIBLE_DEVICES={device.index} and device: cuda")
    return device


def describe(device: Any, dtype: Any = None) -> str:
    """``cuda:0 bfloat16``: the words a summary prints."""
    return f"{device}" + ("" if dtype is None else f" {str(dtype).removeprefix('torch.')}")


def where_backend(backend: Any) -> dict[str, str]:
    """Where a generation backend runs: a local model's device and dtype (``where``), or who places it."""
    found = getattr(backend, "where", None)
    if isinstance(found, dict):
        return found
    kind = type(backend).__name__
    if kind == "VLLMBackend":
        import torch

        dtype = (getattr(backend, "engine_kwargs", None) or {}).get("dtype")
        return {"device": f"{'cuda' if torch.cuda.is_available() else 'cpu'} (vLLM)",
                **({"dtype": str(dtype)} if dtype else {})}
    if kind == "OpenAIBackend":
        return {"device": "server"}
    return {"device": f"unknown ({kind})"}


def ran_on(parts: dict[str, dict[str, str]]) -> str:
    """``agent0, agent1: cuda:0 bfloat16; judge: cpu float32``: parts grouped by where they ran, for a summary."""
    groups: dict[str, list[str]] = {}
    for name, w in parts.items():
        groups.setdefault(" ".join(v for v in (w.get("device"), w.get("dtype")) if v), []).append(name)
    return "; ".join(f"{', '.join(names)}: {w}" for w, names in groups.items())


def record_where(folder: Any, stage: str, parts: dict[str, dict[str, str]]) -> None:
    """Write ``<folder>/devices.json`` (atomically): where each part of ``stage``'s latest invocation ran, with the
    earlier invocations' entries kept (a store resumed on another machine says so)."""
    import json
    import time
    from pathlib import Path

    from pluribus.io import atomic_write_text

    path = Path(folder) / "devices.json"
    history: list[Any] = []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            history = [*old.get("earlier", []), {k: v for k, v in old.items() if k != "earlier"}]
        except (OSError, ValueError, AttributeError):
            history = []  # an unreadable record of where earlier runs ran is replaced, not fatal
    entry = {"stage": stage, "parts": parts, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(path, json.dumps({**entry, "earlier": history[-20:]}, indent=2) + "\n")


def read_where(folder: Any) -> dict[str, dict[str, str]] | None:
    """The parts of ``<folder>/devices.json`` (``record_where``), or None where no such record is."""
    import json
    from pathlib import Path

    try:
        parts = json.loads((Path(folder) / "devices.json").read_text()).get("parts")
    except (OSError, ValueError, AttributeError):
        return None
    return parts if isinstance(parts, dict) else None


def check_recipe(recipe: Any, sections: tuple[str, ...] = ("team", "build", "train", "eval")) -> None:
    """Resolve the recipe's device and those its ``sections`` name, so a device this machine lacks is refused
    (PluribusError naming the setting) before a stage writes anything."""
    settings: list[tuple[str, str | None]] = [("device", recipe.device)]
    if "team" in sections and recipe.team is not None:
        settings += [(f"team.agents.{i}.device", a.device) for i, a in enumerate(recipe.team.agents)]
        settings += [("team.judge.device", recipe.team.judge.device)] if recipe.team.judge else []
    if "build" in sections and recipe.build is not None and recipe.build.completer is not None:
        settings.append(("build.completer.device", recipe.build.completer.device))
    if "train" in sections and recipe.train is not None:
        settings += [(f"train expert {t.expert_name}: rl.prm_device", t.rl.prm_device)
                     for t in recipe.train.trainings() if t.objective == "rl"]
    if "eval" in sections and recipe.eval is not None:
        settings.append(("eval.device", recipe.eval.device))
    for name, setting in settings:
        if setting is not None:
            try:
                resolve(setting)
            except PluribusError as e:
                raise PluribusError(f"{name}: {e}") from None
