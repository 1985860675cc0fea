"""Kernel tests: run Triton kernels on the CPU through the interpreter; this is their own pytest invocation.

TRITON_INTERPRET must be set before triton.jit decorates anything, i.e. before pluribus' Triton kernel modules
are first imported; pluribus.kernels imports them lazily, so setting it here, at conftest import, is early enough.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.kernels)
