"""ModelRef: what a model reference names, parsed once (alias, folder, gguf, file, hub id, missing, +adapter)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pluribus.errors import PluribusError
from pluribus.modelref import EMBEDDED, ModelRef, is_hub_id


@pytest.fixture()
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding a folder ``org/name``, a GGUF file and another file (relative paths resolve here)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("x")
    return tmp_path


@pytest.mark.parametrize(("text", "form"), [
    (EMBEDDED, "alias"),
    ("org/name", "folder"),          # on disk wins: the relative folder, not the Hub id
    ("./org/name", "folder"),
    ("org", "folder"),
    ("m.gguf", "gguf"),
    ("./m.gguf", "gguf"),
    ("notes.txt", "file"),
    ("other/name", "hub"),           # no such folder: org/name is a Hub id
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "hub"),
    ("org/name.v2", "hub"),
    ("./x", "missing"),              # a path that says it is one is never a Hub id
    ("../x/y", "missing"),
    (".hidden/x", "missing"),
    ("~/nowhere-pluribus/x", "missing"),
    ("/nowhere-pluribus/x", "missing"),
    ("a/b/c", "missing"),            # two slashes: a path
    ("a//b", "missing"),
    ("x", "missing"),                # a bare name that is no alias
    ("org/gone.gguf", "missing"),    # a GGUF file that is not there
    ("org/na me", "missing"),
    ("org/", "folder"),
    ("nope/", "missing"),
])
def test_forms(cwd: Path, text: str, form: str) -> None:
    ref = ModelRef.parse(text)
    assert (ref.form, ref.text, ref.adapter) == (form, text, None)
    assert ref.is_local == (form in ("folder", "gguf", "file"))
    assert (ref.path is None) == (form in ("alias", "hub"))
    if ref.path is not None:
        assert ref.path == Path(text).expanduser()


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model").mkdir()
    ref = ModelRef.parse("~/model")
    assert (ref.form, ref.path) == ("folder", tmp_path / "model")


@pytest.mark.parametrize(("text", "model", "form", "adapter"), [
    ("org/name+runs/a/adapters/rsft", "org/name", "folder", "runs/a/adapters/rsft"),
    ("other/name+lora", "other/name", "hub", "lora"),
    (f"{EMBEDDED}+./lora", EMBEDDED, "alias", "./lora"),
    ("./org/name", "./org/name", "folder", None),
])
def test_model_plus_adapter(cwd: Path, text: str, model: str, form: str, adapter: str | None) -> None:
    ref = ModelRef.parse(text, adapter=True)
    assert (ref.text, ref.form, ref.adapter) == (model, form, adapter)
    assert str(ref) == text


def test_plus_is_part_of_the_name_without_adapter(cwd: Path) -> None:
    assert ModelRef.parse("org/name+lora").form == "missing"  # a model alone: '+' is no separator there


@pytest.mark.parametrize("text", ["a+b+c", "+lora", "model+", "+"])
def test_malformed_model_plus_adapter_is_refused(text: str) -> None:
    with pytest.raises(PluribusError, match=re.escape(f"model reference '{text}' must be MODEL or MODEL+ADAPTER")):
        ModelRef.parse(text, adapter=True)


@pytest.mark.parametrize(("text", "ok"), [("a/b", True), ("a.b-c_d/e.f", True), ("./b", False), ("~a/b", False),
                                          ("a/b/c", False), ("a", False), ("/a", False), ("a b/c", False)])
def test_hub_id_shape(text: str, ok: bool) -> None:
    assert is_hub_id(text) is ok
