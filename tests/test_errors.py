"""errors.py: the recurring messages, written once, and the Hub-token policy every push follows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from pluribus.errors import (
    OutputExistsError,
    PluribusError,
    cannot_create,
    not_finite,
    unknown_name,
    validation_message,
)

REPO = Path(__file__).resolve().parents[1]


def test_an_existing_output_is_one_exception_of_both_kinds(tmp_path: Path) -> None:
    e = OutputExistsError(tmp_path / "out", ", or --resume")
    assert isinstance(e, PluribusError) and isinstance(e, FileExistsError)
    assert str(e) == f"output '{tmp_path / 'out'}' already exists; pass --overwrite to replace it, or --resume"


@pytest.mark.parametrize("site", ["io", "hub", "merge", "extract", "build", "train"])
def test_every_stage_refuses_an_existing_output_with_the_one_message(site: str, tmp_path: Path) -> None:
    """The six places that refuse an existing output raise the same exception with the same words."""
    out = tmp_path / "out"
    out.mkdir()
    if site == "io":
        from pluribus.io import atomic_dir

        call = lambda: atomic_dir(out).__enter__()  # noqa: E731
    elif site == "hub":
        from pluribus.hub import export_folder

        call = lambda: export_folder(tmp_path, out)  # noqa: E731
    elif site == "merge":
        from pluribus.merge import MergeSpec, run_merge

        call = lambda: run_merge(MergeSpec(method="cat", inputs=[{"path": "a"}]), out)  # noqa: E731
    elif site == "extract":
        from pluribus.merge.extract import extract_lora

        call = lambda: extract_lora("base", "tuned", out, rank=4)  # noqa: E731
    elif site == "build":
        from pluribus.config import BuildConfig
        from pluribus.data.builders.datasets import build
        from tests.data.test_builders import make_run, sample_trajs

        run = make_run(tmp_path / "run", sample_trajs())
        (out / "rsft").mkdir()
        call = lambda: build(BuildConfig(), [run], out_root=out, progress=False)  # noqa: E731
    else:
        from pluribus.distill.output import check_output

        call = lambda: check_output(out, overwrite=False, resume=False)  # noqa: E731
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite to replace it"):
        call()


def test_the_recurring_messages() -> None:
    assert unknown_name("step rule", "words", ["lines", "regex"]) == "unknown step rule 'words'. Available: lines, regex"
    assert unknown_name("dataset kind(s)", ["x"], ("rsft",)) == "unknown dataset kind(s) ['x']. Available: rsft"
    assert not_finite("lambda", float("nan")) == "lambda must be a finite number (got nan)"
    assert cannot_create("a/b", "Not a directory", "output folder") == "cannot create output folder 'a/b': Not a directory"
    assert cannot_create("a/b", "Not a directory") == "cannot create 'a/b': Not a directory"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    topology: str = "all"


def _errors(data: dict) -> list:
    with pytest.raises(ValidationError) as e:
        _Spec.model_validate(data)
    return e.value.errors()


def test_one_formatter_two_renderings() -> None:
    errors = _errors({"topology": 3, "extra": 1})
    assert validation_message(errors) == (
        "'method' is required; 'topology' = 3: Input should be a valid string; unknown key 'extra' (check the "
        "spelling; allowed keys are listed in configs/quickstart.yaml)")
    assert validation_message(errors, quoted=False) == (
        "method: Field required; topology: Input should be a valid string; extra: Extra inputs are not permitted")


def test_make_dirs_names_the_part_it_cannot_make(tmp_path: Path) -> None:
    from pluribus.io import make_dirs

    (tmp_path / "f").write_text("x")
    with pytest.raises(PluribusError, match=r"^cannot create '.*f/x/y': Not a directory$"):
        make_dirs(tmp_path / "f" / "x" / "y")
    assert make_dirs(tmp_path / "a" / "b").is_dir()


def test_one_token_policy_the_environment_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """build --push-to-hub and export --push-to-hub take the token from the environment and nowhere else: a
    stored `hf auth login` is not used (the token a push uses is the one set for it)."""
    from pluribus.hub import TOKEN_ENVS, hub_token

    for name in (*TOKEN_ENVS, "MY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf"
    home.mkdir()
    (home / "token").write_text("hf_" + "S" * 30)  # a stored login
    monkeypatch.setenv("HF_HOME", str(home))
    with pytest.raises(PluribusError, match="no Hub token: set MY_TOKEN in the environment") as e:
        hub_token("MY_TOKEN")
    assert "S" * 30 not in str(e.value)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_" + "H" * 30)
    assert hub_token("MY_TOKEN") == "hf_" + "H" * 30
    monkeypatch.setenv("HF_TOKEN", "hf_" + "F" * 30)
    assert hub_token() == "hf_" + "F" * 30
    monkeypatch.setenv("MY_TOKEN", "hf_" + "M" * 30)
    assert hub_token("MY_TOKEN") == "hf_" + "M" * 30


@pytest.mark.parametrize("command", [["build", "--store", "nowhere"], ["export", "nowhere", "-o", "out"]])
def test_both_pushes_refuse_a_stored_login_alone_before_any_work(command: list[str], tmp_path: Path) -> None:
    import os

    home = tmp_path / "hf"
    home.mkdir()
    stored = "hf_" + "S" * 30
    (home / "token").write_text(stored)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HOME=str(home), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "pluribus.cli", *command, "--push-to-hub", "me/repo"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "no Hub token: set HF_TOKEN in the environment" in proc.stderr, proc.stderr
    assert stored not in proc.stderr + proc.stdout and not (tmp_path / "out").exists()


def test_a_programmer_bug_is_a_traceback_not_exit_2(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A FileExistsError (or any OSError naming no path) from pluribus's own code is a bug: it keeps its traceback."""
    import pluribus.config
    from pluribus import cli

    def bug(*args, **kwargs):
        raise FileExistsError("internal")

    monkeypatch.setattr(pluribus.config, "load_recipe", bug)
    monkeypatch.setattr(sys, "argv", ["pluribus", "config", "name=x"])
    with pytest.raises(FileExistsError, match="internal"):
        cli.main()
