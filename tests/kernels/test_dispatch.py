"""Dispatch: modes, per-call backend choice, and importing pluribus.kernels without triton."""

import logging
import subprocess
import sys

import pytest
import torch

from pluribus.errors import PluribusError
from pluribus.kernels.dispatch import check_mode, choose_backend, tensor_reason


def test_modes():
    assert check_mode("auto") == "auto"
    with pytest.raises(PluribusError, match="Available: auto, triton, torch, off"):
        check_mode("cuda")


def test_choose_backend(caplog):
    assert choose_backend("torch", None, "op") == "torch"
    assert choose_backend("triton", None, "op") == "triton"
    assert choose_backend("auto", None, "op") == "triton"
    with pytest.raises(PluribusError, match="kernels: triton cannot run op: some reason"):
        choose_backend("triton", "some reason", "op")
    with caplog.at_level(logging.INFO, logger="pluribus.kernels"):
        assert choose_backend("auto", "another reason", "op") == "torch"
    assert "op runs on its PyTorch twin because another reason" in caplog.text


def test_tensor_reason(monkeypatch):
    x = torch.zeros(4, 4, device="cpu")  # on the CPU also where the tests run on CUDA
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CPU" in tensor_reason([x], torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if tensor_reason([x], torch.float32) is None:  # triton installed
        assert "dtype" in tensor_reason([x.double()], torch.float64)
        assert "contiguous" in tensor_reason([x.t()[:, :2]], torch.float32)


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, pluribus.kernels as k\n"
            "x = torch.randn(3, 8); w = torch.randn(5, 8); a = torch.randn(2, 8); b = torch.randn(5, 2)\n"
            "y = k.lora_linear(x, w, a, b, 2.0, mode='auto')\n"
            "print(float((y - (x @ w.T + 2 * (x @ a.T) @ b.T)).abs().max()) < 1e-5)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"
