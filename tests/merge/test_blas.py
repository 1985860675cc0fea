"""NumPy's Gram products for the adapter merge: the same result as torch's, NumPy's BLAS capped only inside."""

from __future__ import annotations

import pytest
import torch

from pluribus.merge import methods as M
from pluribus.merge.blas import capped_gram, numpy_gram


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_gram_products_in_numpy_match_torch_and_leave_numpy_threads_alone():
    from threadpoolctl import threadpool_info

    B, A = rand((300, 40), 7), rand((40, 200), 8)
    before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    plain = M.truncate_factors(B, A, rank=16)
    with capped_gram() as gram:
        assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == [1] * len(before)
        assert gram is (numpy_gram if before else M.gram)
        x = A.double()
        torch.testing.assert_close(gram(x), x @ x.T, rtol=1e-13, atol=1e-13)
        capped = M.truncate_factors(B, A, rank=16, gram=gram)
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == before
    torch.testing.assert_close(capped.B @ capped.A, plain.B @ plain.A, rtol=1e-5, atol=1e-7)
    assert capped.error == pytest.approx(plain.error, abs=1e-12)
