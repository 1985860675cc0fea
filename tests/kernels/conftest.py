"""Kernel tests: run Triton kernels on the CPU through the interpreter; this is their own pytest invocation.

TRITON_INTERPRET must be set before triton.jit decorates anything, i.e. before pluribus' Triton kernel modules
are first imported; pluribus.kernels imports them lazily, so setting it here, at conftest import, is early enough.

On a CUDA GPU (``PLURIBUS_KERNEL_DEVICE=cuda``, as ``make gpu-check`` runs them) the same tests run the compiled
kernels instead: no interpreter, and every tensor a test makes without naming a device is moved to the GPU as it
is made (drawn on the CPU first, so from the same seeded generator the same values as under the interpreter).
"""

import os

import pytest

ON_CUDA = os.environ.get("PLURIBUS_KERNEL_DEVICE") == "cuda"
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.kernels)


@pytest.fixture(autouse=True)
def _tensors_on_cuda(request, monkeypatch):
    """Under ON_CUDA, tensor factories called without a device return their tensor on the GPU, and a test module's
    own tensors (made at import, before this fixture: ids, positions) are swapped for GPU copies."""
    if not ON_CUDA:
        yield
        return
    import torch
    from torch.overrides import TorchFunctionMode

    factories = {torch.randn, torch.rand, torch.randint, torch.zeros, torch.ones, torch.full, torch.empty,
                 torch.tensor, torch.arange, torch.eye, torch.linspace, torch.randperm, torch.randn_like,
                 torch.rand_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like}

    class OnCuda(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func not in factories or kwargs.get("device") is not None:
                return func(*args, **kwargs)
            grad = kwargs.pop("requires_grad", False)
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.device.type == "cpu":
                out = out.to("cuda")
            return out.requires_grad_() if grad else out

    assert torch.cuda.is_available(), "PLURIBUS_KERNEL_DEVICE=cuda needs a CUDA GPU"
    for name, value in list(vars(request.module).items()):
        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            monkeypatch.setattr(request.module, name, value.to("cuda"))
    with OnCuda():
        yield
