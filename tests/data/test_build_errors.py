"""The build stage on bad input: mistyped store records, unusable output paths, a failed push."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from pluribus.config import BuildConfig
from pluribus.data.builders import build
from pluribus.errors import PluribusError
from pluribus.stages.build import push_to_hub
from tests.data.test_builders import make_run, sample_trajs


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda d: d["rounds"][-1][0].update(response=None), "Turn field 'response' is null, expected str"),
    (lambda d: d["rounds"][0].__setitem__(0, None), "Turn record is null, not a JSON object"),
    (lambda d: d.update(rounds="x"), "Trajectory field 'rounds' is \"x\", expected a list of rounds"),
    (lambda d: d.update(question=None), "Trajectory field 'question' is null, expected str"),
    (lambda d: d["rounds"][0][0].update(tokens_in="10"), "Turn field 'tokens_in' is \"10\", expected int"),
    (lambda d: d.pop("gold"), r"Trajectory record lacks the field\(s\) \['gold'\]"),
], ids=["response-null", "turn-null", "rounds-str", "question-null", "tokens-str", "no-gold"])
def test_a_record_with_a_wrong_field_type_is_a_corrupt_line(tmp_path: Path, edit, needle: str) -> None:
    run = make_run(tmp_path / "run", sample_trajs())
    shard = run / "trajectories" / "shard-00000.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    first = json.loads(lines[0])
    edit(first)
    shard.write_text(json.dumps(first) + "\n" + "".join(lines[1:]))
    with pytest.raises(PluribusError, match=rf"shard-00000.jsonl' line 1 is corrupt \(ValueError: {needle}.*--skip-corrupt"):
        build(BuildConfig(), [run], kinds=["rsft", "augmented"], progress=False)
    assert not (run / "datasets").exists()
    built = build(BuildConfig(skip_corrupt=True), [run], kinds=["rsft", "augmented"], progress=False)
    assert built[0].stats["skipped_lines"] == ["trajectories/shard-00000.jsonl:1"]


def test_an_output_folder_under_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", sample_trajs())
    (tmp_path / "q.yaml").write_text("name: x\n")
    with pytest.raises(PluribusError, match=r"cannot create '.*q.yaml/x': '.*q.yaml' is a file, not a folder"):
        build(BuildConfig(), [run], out_root=tmp_path / "q.yaml" / "x", progress=False)


def test_a_failed_push_is_one_line_without_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = build(BuildConfig(), [make_run(tmp_path / "run", sample_trajs())], progress=False)
    with socket.socket() as s:  # a loopback port nobody listens on: a real refused connection
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "hf_" + "Z" * 30
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", f"http://127.0.0.1:{port}", raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False, raising=False)
    with pytest.raises(PluribusError) as info:
        push_to_hub(built, "me/ds")
    assert str(info.value).startswith("push to 'me/ds' failed: ") and token not in str(info.value)
    with pytest.raises(PluribusError, match="'bad repo!!' is not a valid Hub repo id"):
        push_to_hub(built, "bad repo!!")


def test_a_line_with_no_rounds_is_corrupt_also_with_skip_corrupt(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", sample_trajs())
    shard = run / "trajectories" / "shard-00000.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    hollow = json.loads(lines[0])
    hollow["rounds"] = []
    shard.write_text(json.dumps(hollow) + "\n" + "".join(lines[1:]))
    with pytest.raises(PluribusError, match=r"line 1 is corrupt \(ValueError: Trajectory field 'rounds' is empty"
                                            r".*--skip-corrupt.*`pluribus repair "):
        build(BuildConfig(), [run], kinds=["rsft", "augmented", "process"], progress=False)
    built = build(BuildConfig(skip_corrupt=True), [run], kinds=["rsft", "augmented"], progress=False)
    assert built[0].stats["skipped_lines"] == ["trajectories/shard-00000.jsonl:1"]


def test_a_duplicated_line_is_reported_not_dropped_silently(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", sample_trajs())
    shard = run / "trajectories" / "shard-00000.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines) + lines[0])
    (built,) = build(BuildConfig(), [run], kinds=["rsft"], progress=False)
    assert built.stats["duplicate_lines"] == [f"trajectories/shard-00000.jsonl:{len(lines) + 1}"]
    assert "Store lines repeating a problem (the first line was used) (1)" in (built.path / "README.md").read_text()
