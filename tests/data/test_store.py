"""TrajectoryStore: append-only shards, resume, exactly-once, torn-line repair, config guard, datasets-readable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pluribus.data.store import TrajectoryStore
from pluribus.errors import PluribusError


def rec(i: int, **extra) -> dict:
    return {"problem_id": f"p{i}", "final_answer": None if i % 3 == 0 else str(i), "final_correct": i % 2 == 0,
            "rounds": [[{"agent": "a", "answer": None if i % 4 == 0 else str(i), "meta": {"peers": []}}]], **extra}


def test_append_read_resume_and_exactly_once(tmp_path):
    d = tmp_path / "traj"
    with TrajectoryStore(d, "h1") as s:
        assert s.done_ids() == set() and len(s) == 0
        assert s.append([rec(0), rec(1)]) == 2
        assert s.append([]) == 0
        run_id = s.run_id
        with pytest.raises(PluribusError, match="already holds problem_id \\['p1'\\]"):
            s.append([rec(2), rec(1)])
        with pytest.raises(PluribusError, match="p3"):
            s.append([rec(3), rec(3)])
    with TrajectoryStore(d, "h1") as s:  # resume
        assert s.done_ids() == {"p0", "p1"} and s.run_id == run_id
        s.append([rec(2)])
    reader = TrajectoryStore(d)
    assert [r["problem_id"] for r in reader.iter_records()] == ["p0", "p1", "p2"]
    assert list(reader.iter_records())[1] == rec(1)
    with pytest.raises(PluribusError, match="read-only"):
        reader.append([rec(9)])
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["config_hash"] == "h1" and manifest["run_id"] == run_id


def test_changed_config_refused_unless_new_run(tmp_path):
    d = tmp_path / "traj"
    with TrajectoryStore(d, "h1") as s:
        s.append([rec(0)])
        old_run = s.run_id
    with pytest.raises(PluribusError, match="--new-run"):
        TrajectoryStore(d, "h2")
    assert TrajectoryStore(d).done_ids() == {"p0"}  # refused: nothing touched
    with TrajectoryStore(d, "h2", new_run=True) as s:
        assert s.done_ids() == set() and s.run_id != old_run
        assert s.manifest["previous_runs"][0]["run_id"] == old_run
    moved = tmp_path / f"traj.prev-{old_run}"
    assert TrajectoryStore(moved).done_ids() == {"p0"}


def test_empty_store_takes_any_config_without_archive(tmp_path):
    d = tmp_path / "traj"
    with TrajectoryStore(d, "h1") as s:  # a first run that stored nothing (server unreachable)
        run_id = s.run_id
    (d / "shard-00000.jsonl").write_bytes(b'{"problem_id": "p0"')  # torn, never acknowledged: no record
    with TrajectoryStore(d, "h2") as s:
        assert s.done_ids() == set() and s.run_id == run_id
    with TrajectoryStore(d, "h3", new_run=True) as s:  # nothing to move aside either
        assert s.done_ids() == set() and s.run_id == run_id
        s.append([rec(1)])
    assert json.loads((d / "manifest.json").read_text())["config_hash"] == "h3"
    assert list(tmp_path.glob("traj.prev-*")) == []
    with pytest.raises(PluribusError, match="--new-run"):  # once it holds a record, the guard is back
        TrajectoryStore(d, "h4")


def test_a_store_hashed_by_an_earlier_version_resumes_under_the_new_hash(tmp_path):
    d = tmp_path / "traj"
    with TrajectoryStore(d, "old") as s:
        s.append([rec(1)])
    with TrajectoryStore(d, "new", same_config=["old"]) as s:
        assert s.done_ids() == {rec(1)["problem_id"]}
    assert json.loads((d / "manifest.json").read_text())["config_hash"] == "new"
    assert list(tmp_path.glob("traj.prev-*")) == []


def test_missing_store_and_second_writer(tmp_path):
    with pytest.raises(PluribusError, match="no trajectory store"):
        TrajectoryStore(tmp_path / "nothing")
    s = TrajectoryStore(tmp_path / "t", "h")
    with pytest.raises(PluribusError, match="another process"):
        TrajectoryStore(tmp_path / "t", "h")
    s.close()
    TrajectoryStore(tmp_path / "t", "h").close()


@pytest.mark.parametrize(("manifest", "message"), [
    ("[1, 2]", "is not a JSON object"),
    ("\udcff", "is unreadable"),
    ({"previous_runs": "abc"}, 'has previous_runs = "abc", expected a list of objects'),
    ({"key": 5}, "has key = 5, expected a string"),
    ({"run_id": None}, "has run_id = null, expected a string"),
])
@pytest.mark.parametrize("writable", [False, True])
def test_a_corrupt_manifest_is_named(tmp_path, manifest, message, writable):
    TrajectoryStore(tmp_path / "t", "h").close()
    path = tmp_path / "t" / "manifest.json"
    if isinstance(manifest, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), **manifest}))
    else:
        path.write_bytes(manifest.encode("utf-8", "surrogateescape"))
    with pytest.raises(PluribusError, match=f"store manifest '{path}' {message}"):
        TrajectoryStore(tmp_path / "t", "h" if writable else None)
    path.unlink()  # not left locked: a new run may start in the folder
    TrajectoryStore(tmp_path / "t", "h").close()


def test_torn_last_line_is_reported_then_repaired(tmp_path):
    d = tmp_path / "traj"
    with TrajectoryStore(d, "h") as s:
        s.append([rec(0), rec(1)])
    shard = d / "shard-00000.jsonl"
    with shard.open("ab") as f:
        f.write(json.dumps(rec(2)).encode()[:25])  # what a kill in the middle of write() leaves
    with pytest.raises(PluribusError, match=r"shard-00000.jsonl' line 3 is corrupt"):
        list(TrajectoryStore(d).iter_records())
    assert [r["problem_id"] for r in TrajectoryStore(d).iter_records(skip_corrupt=True)] == ["p0", "p1"]
    with TrajectoryStore(d, "h") as s:  # a writer cuts the torn line; its problem is pending again
        assert s.repaired_lines == 1 and s.done_ids() == {"p0", "p1"}
        s.append([rec(2)])
    assert shard.read_bytes().count(b"\n") == 3 and shard.read_bytes().endswith(b"\n")


def test_shards_roll_over_and_datasets_reads_the_store(tmp_path):
    import datasets

    d = tmp_path / "traj"
    with TrajectoryStore(d, "h", shard_records=4) as s:
        for i in range(0, 10, 3):
            s.append([rec(j) for j in range(i, min(i + 3, 10))])
    # Appends of 3, 3, 3, 1 records with at most 4 a shard: a batch never straddles two shards.
    assert [p.name for p in s.shards()] == ["shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]
    assert [p.read_bytes().count(b"\n") for p in s.shards()] == [3, 3, 4]
    ds = datasets.load_dataset("json", data_files=str(d / "shard-*.jsonl"), split="train")
    assert sorted(ds["problem_id"], key=lambda x: int(x[1:])) == [f"p{i}" for i in range(10)]
    assert ds.num_rows == 10 and ds[0]["final_answer"] is None


WRITER = textwrap.dedent("""
    import sys
    from pluribus.data.store import TrajectoryStore
    s = TrajectoryStore(sys.argv[1], "h")
    done = s.done_ids()
    for i in range(int(sys.argv[2])):
        if f"p{i}" not in done:
            s.append([{"problem_id": f"p{i}", "blob": "x" * 200_000}])
""")


def test_sigkill_while_appending_then_restart(tmp_path):
    d = tmp_path / "traj"
    n = 200
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(d), str(n)])
    shard = d / "shard-00000.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (shard.exists() and shard.stat().st_size > 5_000_000):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < TrajectoryStore(d).__len__() < n
    subprocess.run([sys.executable, "-c", WRITER, str(d), str(n)], check=True, timeout=120)
    ids = [json.loads(line)["problem_id"] for line in shard.read_bytes().splitlines()]
    assert sorted(ids) == sorted(f"p{i}" for i in range(n))
    assert shard.read_bytes().endswith(b"\n")


# ------------------------------------------------------------------------------ failures and repair


def test_a_full_disk_is_one_line_and_the_store_stays_resumable(tmp_path, monkeypatch):
    import errno

    import pluribus.data.store as store_module

    d = tmp_path / "traj"
    with TrajectoryStore(d, "h") as s:
        s.append([rec(0)])
        real_fsync = os.fsync

        def full(fd):  # the lines reached the page cache, then the disk filled: what a real ENOSPC leaves
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(store_module.os, "fsync", full)
        with pytest.raises(PluribusError, match=r"cannot write to '.*shard-00000.jsonl': No space left on device; "
                                                r"free space on the disk holding '.*traj', then rerun"):
            s.append([rec(1), rec(2)])
        monkeypatch.setattr(store_module.os, "fsync", real_fsync)
    shard = d / "shard-00000.jsonl"
    assert shard.read_bytes().count(b"\n") == 1  # the unacknowledged lines are gone, not half there
    with TrajectoryStore(d, "h") as s:
        assert s.done_ids() == {"p0"} and s.repaired_lines == 0
        s.append([rec(1), rec(2)])
    assert [r["problem_id"] for r in TrajectoryStore(d).iter_records()] == ["p0", "p1", "p2"]


def test_a_full_disk_while_writing_the_manifest_names_the_file(tmp_path, monkeypatch):
    import errno

    import pluribus.io

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pluribus.io.os, "fsync", full)
    with pytest.raises(PluribusError, match=r"cannot write '.*manifest.json': No space left on device; free space"):
        TrajectoryStore(tmp_path / "traj", "h")
    assert not (tmp_path / "traj" / "manifest.json").exists()


def test_duplicated_lines_are_read_once_and_listed(tmp_path):
    d = tmp_path / "traj"
    with TrajectoryStore(d, "h") as s:
        s.append([rec(0), rec(1)])
    shard = d / "shard-00000.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(lines[0] + lines[1] + lines[0])  # a line pasted twice by hand
    store = TrajectoryStore(d)
    assert [r["problem_id"] for r in store.iter_records()] == ["p0", "p1"]
    assert store.duplicates == ["shard-00000.jsonl:3"]


def test_a_valid_json_line_that_fails_the_check_is_corrupt(tmp_path):
    def check(r):
        if not r.get("rounds"):
            raise ValueError("Trajectory field 'rounds' is empty")

    d = tmp_path / "traj"
    with TrajectoryStore(d, "h", check=check) as s:
        s.append([rec(0), rec(1)])
    shard = d / "shard-00000.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(lines[0] + json.dumps({"problem_id": "p9", "rounds": []}).encode() + b"\n" + lines[1])
    with pytest.raises(PluribusError, match=r"line 2 is corrupt \(Trajectory field 'rounds' is empty\); "
                                            r"run `pluribus repair .*traj`"):
        TrajectoryStore(d, "h", check=check)
    # the refused store was unlocked: opening it again says the same, not 'being written by another process'
    with pytest.raises(PluribusError, match="is corrupt"):
        TrajectoryStore(d, "h", check=check)


def test_repair_moves_corrupt_and_duplicated_lines_aside(tmp_path):
    from pluribus.data.store import repair_store

    d = tmp_path / "traj"
    with TrajectoryStore(d, "h") as s:
        s.append([rec(0), rec(1), rec(2)])
    shard = d / "shard-00000.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(lines[0] + b'{"problem_id": "p1", "trunc\n' + lines[2] + lines[0])
    report = repair_store(d)
    assert report["corrupt"] == ["shard-00000.jsonl:2"] and report["duplicates"] == ["shard-00000.jsonl:4"]
    assert report["moved_to"].read_bytes() == b'{"problem_id": "p1", "trunc\n' + lines[0]
    assert shard.read_bytes() == lines[0] + lines[2]
    with TrajectoryStore(d, "h") as s:  # resumes: p1 is pending again
        assert s.done_ids() == {"p0", "p2"}
    assert repair_store(d)["moved_to"] is None


def test_a_store_path_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "trajectories").write_text("not a folder")
    with pytest.raises(PluribusError, match=r"'.*trajectories' exists but is not a folder"):
        TrajectoryStore(tmp_path / "trajectories", "h")


def test_manifest_and_shards_get_the_usual_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        with TrajectoryStore(tmp_path / "traj", "h") as s:
            s.append([rec(0)])
    finally:
        os.umask(old)
    assert (tmp_path / "traj" / "manifest.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "traj" / "shard-00000.jsonl").stat().st_mode & 0o777 == 0o644
