"""Training datasets in: the rows of a built dataset (or a user's TRL dataset), checked, fingerprinted and split."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pluribus.data.builders.process import SHEPHERD_TAG
from pluribus.errors import PluribusError

# The fields a row of each dataset kind must have: TRL's own formats (conversational ``messages``, stepwise
# supervision). What pluribus's builders add beside them (problem_id, agent, round, kind, scores, debate) is
# optional on input, so a user's TRL dataset trains as it is (``load_rows`` fills in what training reads).
DATASET_COLUMNS = {
    "rsft": ("messages",),
    "augmented": ("messages",),
    "process": ("prompt", "completions", "labels"),
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")



def dataset_files(path: str | Path) -> list[Path]:
    """The parquet / jsonl files of a dataset folder (or the file itself), sorted; a PluribusError if none."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PluribusError(f"dataset '{path}' does not exist; build it first (`pluribus build`) or pass --dataset")
    # a built dataset keeps its rows in data/ and other formats of the same rows beside it (math_shepherd/,
    # prompt_completion/): read the rows once, in the format their kind trains on
    root = path / "data" if (path / "data").is_dir() else path
    files = sorted(p for p in root.rglob("*") if p.suffix in {".parquet", ".jsonl"} and not p.name.startswith("."))
    if not files:
        raise PluribusError(f"dataset folder '{path}' holds no .parquet or .jsonl files")
    return files


def _corrupt(f: Path, why: str) -> PluribusError:
    return PluribusError(f"dataset file '{f}' is corrupt or truncated ({why}); rebuild the dataset "
                         "(`pluribus build --overwrite`) or remove that file")


def _count_rows(files: list[Path]) -> int:
    """Rows over all files, from parquet footers and jsonl line counts; an unreadable file is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        try:
            if f.suffix == ".parquet":
                total += pq.ParquetFile(f).metadata.num_rows
            else:
                with f.open(encoding="utf-8") as fh:
                    total += sum(1 for line in fh if line.strip())
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise _corrupt(f, f"{type(e).__name__}: {e}") from None
    return total


def _find_corrupt(files: list[Path]) -> PluribusError | None:
    """After datasets failed to load the files: the error naming the first one that does not parse, if any."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        if f.suffix == ".parquet":
            try:
                pq.read_table(f)
            except (pa.ArrowException, OSError) as e:
                return _corrupt(f, f"{type(e).__name__}: {e}")
            continue
        with f.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return _corrupt(f, f"line {n} is not valid JSON: {e.msg}")
                if not isinstance(row, dict):
                    return _corrupt(f, f"line {n} is a JSON {type(row).__name__}, not an object")
    return None


def is_hub_id(ref: str | Path) -> bool:
    """Whether ``ref`` names a Hub dataset (``owner/name``) rather than a path here: it does not exist locally and
    has the shape of a repo id."""
    return not Path(ref).exists() and bool(_HUB_ID.fullmatch(str(ref)))


def _load_local(path: str | Path) -> Any:
    from datasets import load_dataset

    files = dataset_files(path)
    fmt = "parquet" if files[0].suffix == ".parquet" else "json"
    if any((f.suffix == ".parquet") != (fmt == "parquet") for f in files):
        raise PluribusError(f"dataset '{path}' mixes parquet and jsonl files; keep one format per folder")
    if _count_rows(files) == 0:
        raise PluribusError(f"dataset '{path}' is empty; the builder kept no rows (check its filters)")
    try:
        return load_dataset(fmt, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # datasets wraps a parse failure in its own error types; name the bad file instead
        bad = _find_corrupt(files)
        if bad is not None:
            raise bad from None
        raise PluribusError(f"dataset '{path}' cannot be loaded ({type(e).__name__}: {e}); its files may "
                            "disagree on columns or types, rebuild it with `pluribus build --overwrite`") from None


def _load_hub(repo_id: str) -> Any:
    """The ``train`` split of a Hub dataset through ``datasets.load_dataset`` (its cache when offline)."""
    from datasets import load_dataset

    try:
        return load_dataset(repo_id, split="train")
    except Exception as e:  # offline and not cached, no such repo, no train split: one line that says which
        raise PluribusError(f"dataset '{repo_id}' is not a file or folder here, and loading it as a Hub dataset "
                            f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass an "
                            "existing path, or a Hub id that is reachable or in the datasets cache") from None


def load_rows(path: str | Path, kind: str, *, shepherd_tag: str = SHEPHERD_TAG) -> Any:
    """Load a dataset of ``kind`` (rsft | augmented | process) as a ``datasets.Dataset`` and check its fields.

    ``path`` is a local folder or file (parquet or jsonl), or a Hub dataset id (``owner/name``, its ``train``
    split, through ``datasets.load_dataset``). TRL's formats are read as they are: a conversational ``messages``
    dataset, a prompt-completion one (made into ``messages``), a stepwise-supervision one (``prompt``,
    ``completions``, ``labels``); for ``process``, Math-Shepherd's text format too (``input`` with
    ``shepherd_tag`` after each step, ``label`` with ``+`` / ``-`` there; ``read_math_shepherd``). What
    pluribus's builders add is filled in where absent: ``problem_id`` from a hash of the question, ``scores``
    from the labels. Raises PluribusError when the dataset is missing, empty, lacks a required field, or (process)
    has a row whose labels do not match its steps.
    """
    ds = _load_hub(str(path)) if is_hub_id(path) else _load_local(path)
    if len(ds) == 0:
        raise PluribusError(f"dataset '{path}' is empty; the builder kept no rows (check its filters)")
    if kind != "process" and "messages" not in ds.column_names and {"prompt", "completion"} <= set(ds.column_names):
        chats = [_prompt_completion_as_messages(r) for r in ds]  # no ds.map: its progress bar ignores --no-progress
        ds = ds.add_column("messages", chats).remove_columns(["prompt", "completion"])
    if kind == "process" and "prompt" not in ds.column_names and {"input", "label"} <= set(ds.column_names):
        ds = _from_math_shepherd(ds, path, shepherd_tag)
    missing = [f for f in DATASET_COLUMNS[kind] if f not in ds.column_names]
    if missing:
        raise PluribusError(
            f"dataset '{path}' is not a '{kind}' dataset: missing field(s) {missing}; "
            f"it has {ds.column_names}, a '{kind}' row needs {list(DATASET_COLUMNS[kind])}"
            + (" (or TRL's prompt + completion)" if kind != "process" else " (or Math-Shepherd's input + label)")
        )
    if kind == "process":
        for i, row in enumerate(ds):
            check_process_row(row, f"dataset '{path}' row {i}")
    if "problem_id" not in ds.column_names:
        ds = ds.add_column("problem_id", [_question_id(r, kind) for r in ds])
    if kind == "process" and "scores" not in ds.column_names:  # hard labels only: the soft target is the label
        ds = ds.add_column("scores", [[float(x) for x in r["labels"]] for r in ds])
    return ds


def check_process_row(row: dict[str, Any], where: str) -> None:
    """A stepwise row: a prompt, at least one step (text), one true/false label per step (and one score, if any)."""
    steps, labels, scores = row.get("completions"), row.get("labels"), row.get("scores")
    prompt = row.get("prompt")
    if not (isinstance(prompt, str) or isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)):
        raise PluribusError(f"{where}: prompt is a {type(prompt).__name__}, not text or a list of chat messages")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise PluribusError(f"{where}: completions must be a non-empty list of step texts, got {steps!r:.80}")
    if not isinstance(labels, list) or len(labels) != len(steps):
        n = len(labels) if isinstance(labels, list) else type(labels).__name__
        raise PluribusError(f"{where}: {len(steps)} steps but {n} labels; each step needs one label (true/false)")
    bad = next((k for k, v in enumerate(labels) if not isinstance(v, bool)), None)
    if bad is not None:
        raise PluribusError(f"{where}: label {bad} is {labels[bad]!r}, not true/false; stepwise labels are booleans")
    if scores is not None and (not isinstance(scores, list) or len(scores) != len(steps)
                               or not all(isinstance(x, int | float) and 0.0 <= x <= 1.0 for x in scores)):
        raise PluribusError(f"{where}: scores must be one number in [0, 1] per step ({len(steps)}), got {scores!r:.80}")


def _from_math_shepherd(ds: Any, path: str | Path, tag: str) -> Any:
    """Math-Shepherd rows (``input``, ``label``) as stepwise ones; their other columns are kept."""
    from datasets import Dataset

    from pluribus.data.builders.process import read_math_shepherd

    rows = []
    for i, row in enumerate(ds):
        stepwise = read_math_shepherd(row, tag, where=f"dataset '{path}' row {i}")
        rows.append({**{k: v for k, v in row.items() if k not in ("input", "label")}, **stepwise})
    return Dataset.from_list(rows)


def _prompt_completion_as_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """TRL's prompt-completion row (strings or message lists) as one chat: the loss is on the completion alone
    either way, since SFT labels the assistant turns only."""
    prompt, completion = row["prompt"], row["completion"]
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    tail = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    return head + tail


def _question_id(row: dict[str, Any], kind: str) -> str:
    """A row's problem, where the data names none: a hash of its question (the first user turn), so that
    ``split_eval`` keeps rows of one question on one side."""
    if kind == "process":
        prompt = row["prompt"]
        question = prompt if isinstance(prompt, str) else next(
            (m.get("content", "") for m in prompt if m.get("role") == "user"), json.dumps(prompt))
    else:
        question = next((m.get("content", "") for m in row["messages"] if m.get("role") == "user"),
                        json.dumps(row["messages"]))
    return "q-" + hashlib.sha256(str(question).encode()).hexdigest()[:12]


def fingerprint(path: str | Path) -> dict[str, Any]:
    """sha256 of each file of a dataset, so a training record names exactly the data it saw (a Hub dataset's:
    the files of its local cache, keyed by the Hub id)."""
    out = {}
    if is_hub_id(path):
        files = [Path(f["filename"]) for f in _load_hub(str(path)).cache_files]
        return {f"{path}:{f.name}": hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    for f in dataset_files(path):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[str(f)] = h.hexdigest()
    return out


def split_eval(ds: Any, fraction: float, seed: int) -> tuple[Any, Any | None]:
    """Hold out ``fraction`` of the rows for the eval loss; grouped by problem so no problem is on both sides."""
    if fraction <= 0 or len(ds) < 2:
        return ds, None
    ids = sorted(set(ds["problem_id"]))
    n_eval = max(1, round(len(ids) * fraction))
    if n_eval >= len(ids):
        return ds, None
    rank = {pid: hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest() for pid in ids}
    held = set(sorted(ids, key=rank.__getitem__)[:n_eval])
    flags = [pid in held for pid in ds["problem_id"]]
    return (ds.select([i for i, f in enumerate(flags) if not f]), ds.select([i for i, f in enumerate(flags) if f]))
