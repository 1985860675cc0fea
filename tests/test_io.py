"""Atomic folder writes: a failed writer leaves nothing, a killed writer's leftovers go with the next write."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from pluribus.io import atomic_dir, remove_stale_temps


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_failure_inside_removes_the_temporary_folder(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_only_dead_writers_of_this_host_and_target_are_cleaned(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".out.{host}-{dead_pid()}.abc.tmp"
    live = tmp_path / f".out.{host}-{os.getppid()}.abc.tmp"
    other_host = tmp_path / f".out.elsewhere-{dead_pid()}.abc.tmp"
    other_target = tmp_path / f".other.{host}-{dead_pid()}.abc.tmp"
    for p in (dead, live, other_host, other_target):
        p.mkdir()
    assert remove_stale_temps(tmp_path / "out") == [dead]
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "done").write_text("ok")
    assert (tmp_path / "out" / "done").read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other_host.name, other_target.name])


def test_an_output_that_cannot_be_created_is_one_line_naming_it(tmp_path):
    from pluribus.errors import PluribusError

    (tmp_path / "q.yaml").write_text("x")
    for target in (tmp_path / "q.yaml" / "x", tmp_path / "q.yaml" / "x" / "y"):
        match = rf"cannot create output folder '{re.escape(str(target))}': '.*q\.yaml' is a file, not a folder"
        with pytest.raises(PluribusError, match=match), atomic_dir(target):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.yaml"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_usual_mode_under_the_umask(tmp_path, umask, mode):
    from pluribus.config import Recipe, write_recipe

    old = os.umask(umask)
    try:
        path = write_recipe(Recipe(root=str(tmp_path)))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode  # mkstemp alone gives 0600 whatever the umask
