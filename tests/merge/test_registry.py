"""The merge-method registry: one registration per method, read by the spec, the CLI, mergekit and the README."""

from __future__ import annotations

from pathlib import Path

import pytest

from pluribus.errors import PluribusError
from pluribus.merge.config import parse_merge_config
from pluribus.merge.registry import METHODS, get_method, markdown_table, merge_method

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_table_is_the_registry():
    text = README.read_text()
    assert markdown_table() in text, "README's method table differs from the registry: paste registry.markdown_table()"


def test_an_unknown_method_names_the_available_ones():
    with pytest.raises(PluribusError, match=r"^Unknown merge method 'tie'\. Available: cat, svd, linear, task_arithmetic"):
        get_method("tie")


def test_every_method_states_its_options_defaults_and_math():
    for m in METHODS.values():
        assert m.math and m.cite and m.default_rank in ("sum", "largest")
        assert ("normalize" in m.options) == (m.normalize is not None), m.name
        # the spec accepts exactly the options the registration lists
        for option, value in {"rank": 4, "density": 0.5, "drop": 0.3, "normalize": True, "trim": "global"}.items():
            data = {"method": m.name, "inputs": [{"path": "a"}], option: value}
            if option in m.options:
                parse_merge_config(data)
            else:
                with pytest.raises(PluribusError, match=f"{option} has no effect in method '{m.name}'"):
                    parse_merge_config(data)
    # exact by default only where exact in low rank; the methods named for a sum are (svd is named for truncating)
    assert all(m.linear for m in METHODS.values() if m.default_rank == "sum")
    assert {"cat", "linear", "task_arithmetic"} <= {m.name for m in METHODS.values() if m.default_rank == "sum"}
    assert METHODS["svd"].default_rank == "largest"


def test_the_cli_help_lists_the_registry():
    from typer.testing import CliRunner

    from pluribus.cli import app

    out = CliRunner().invoke(app, ["merge", "--help"], terminal_width=400).output
    assert " | ".join(METHODS) in " ".join(out.split())


def test_a_registration_is_checked():
    with pytest.raises(ValueError, match="unknown option"):
        merge_method("x", cite="-", options=("densty",), linear=True)
    with pytest.raises(ValueError, match="normalize's default"):
        merge_method("x", cite="-", options=("normalize",), linear=True)
    with pytest.raises(ValueError, match="registered twice"):
        merge_method("ties", cite="-", options=(), linear=False)(lambda ds, p, g, s: ds[0])


@pytest.mark.parametrize("normalize", [None, True, False])
def test_a_linear_registration_is_linear(normalize):
    """``linear=True`` is what lets adapters keep the exact merge as stacked factors with coefficients c_t read off
    the method on unit vectors: check that its function is that weighted sum on random task vectors."""
    import dataclasses

    import torch

    from pluribus.merge import methods as M
    from pluribus.merge.adapters import linear_coefficients

    g = torch.Generator().manual_seed(0)
    ds = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    for m in (m for m in METHODS.values() if m.linear):
        p = M.MethodParams(weights=(1.0, -0.5, 2.0), lam=0.7,
                           normalize=normalize if "normalize" in m.options else None)
        coefs = linear_coefficients(m, p)
        resolved = dataclasses.replace(p, normalize=m.normalize_default(False) if p.normalize is None else p.normalize)
        got = m.fn([d.clone() for d in ds], resolved, None, False)
        torch.testing.assert_close(got, sum(c * d for c, d in zip(coefs, ds, strict=True)))
