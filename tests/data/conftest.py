"""Fixtures of the backend and debate tests."""

import pytest


@pytest.fixture(autouse=True)
def one_thread():
    """Torch with one thread: on a shared CPU, spinning OpenMP threads make generation many times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
