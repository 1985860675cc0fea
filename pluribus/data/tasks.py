"""Problem sources: GSM8K, any jsonl / parquet / Hub dataset by field mapping, multiple choice, synthetic arithmetic.

``load_problems(task)`` is the one entry point: it loads the source, keeps the problems of the requested
split and then the first ``n``. The split is a seeded hash of each problem's question text, so it never depends
on ``n`` or on file order, and train and held-out never share a question.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pluribus.config import SyntheticConfig, TaskConfig
from pluribus.data.answers import LETTERS, extract_answer, gold_choice, normalize_answer
from pluribus.data.records import Problem
from pluribus.errors import PluribusError, unknown_name

GSM8K_ENV = "PLURIBUS_GSM8K"
GSM8K_HUB = "openai/gsm8k"
DEFAULT_SYNTHETIC_N = 1000  # problems per split when a synthetic task sets no n (the generator is unbounded)

# Named difficulty levels of the synthetic task: SyntheticConfig fields (a level replaces them all).
#
# Greedy accuracy of the embedded SmolLM2-135M-Instruct (bf16, CPU, chat template, max_new_tokens 200) on the
# first 60 problems of each level's seed-0 stream, measured 2026-11-21 with
#   .venv/bin/python bench/task_levels.py --n 60 --prompt answer_is   ("... end your reply with: The answer is N")
#   .venv/bin/python bench/task_levels.py --n 60 --prompt debate      (the debate's round-0 prompt, \boxed{})
#
#   level        answer_is  debate     level        answer_is  debate
#   add1            62%       28%      word1           22%       15%
#   addsub1         58%       28%      word2 (+)        7%        8%
#   quickstart      60% (#)   25% (#)  easy            10%        -
#   wordadd1        20%       15%      medium           0% (*)    -
#   add2x1           3%        -       hard             0% (*)    -
# (*) measured before answers.py learned "the answer is actually N" (a fix that can only raise a score).
# (+) measured when these parameters were named "quickstart": same distribution, another sample.
# (#) all 126 questions of the level (`--n 200 --levels quickstart`): 76/126 and 32/126; its first 60 gave 65%
#     and 30%. The quickstart debate uses the \boxed prompt, so 25% is the figure that applies there.
# The model is weaker than its size suggests on words: one-step word problems score below bare additions, and
# the \boxed prompt costs it half its accuracy (it rambles before answering).
LEVELS: dict[str, dict[str, Any]] = {
    # 1-digit additions: "What is 3 + 5?" (81 distinct questions)
    "add1": {"steps": 1, "digits": 1, "ops": ["+"], "style": "expression"},
    # 1-digit additions and subtractions, never below zero: "What is 7 - 3?" (126 distinct questions)
    "addsub1": {"steps": 1, "digits": 1, "ops": ["+", "-"], "style": "expression"},
    # The quickstart: addsub1's problems, the one level inside 20-60% with both prompts, so the team has right
    # and wrong answers to debate and learn from. 126 distinct questions: about 100 train, 25 held out at 0.2.
    "quickstart": {"steps": 1, "digits": 1, "ops": ["+", "-"], "style": "expression"},
    # The demo's level: one or two additions/subtractions of 1-digit numbers, never below zero:
    # "What is 7 - 3 + 5?". About 1,400 distinct questions (126 of one step), so a held-out split of 200+ problems
    # that share no question with training.
    "addsub12": {"steps": 2, "min_steps": 1, "digits": 1, "ops": ["+", "-"], "style": "expression"},
    # 2-digit + 1-digit additions: "What is 47 + 8?"
    "add2x1": {"steps": 1, "first_digits": 2, "digits": 1, "ops": ["+"], "style": "expression"},
    # One-step word problems with small numbers: "Mia has 7 apples. She finds 3 more apples. ..."
    "wordadd1": {"steps": 1, "digits": 1, "ops": ["+"], "style": "word"},
    "word1": {"steps": 1, "digits": 1, "ops": ["+", "-"], "style": "word"},
    "word2": {"steps": 2, "digits": 1, "ops": ["+", "-"], "style": "word"},
    "easy": {"steps": 2, "min_steps": 1, "digits": 1, "ops": ["+", "-"], "style": "word"},
    "medium": {"steps": 3, "min_steps": 2, "digits": 2, "ops": ["+", "-"], "style": "word"},
    "hard": {"steps": 5, "min_steps": 3, "digits": 2, "ops": ["+", "-", "*"], "style": "word"},
}


# --------------------------------------------------------------------------------------------- split


def split_of(question: str, seed: int, heldout_fraction: float) -> str:
    """'heldout' or 'train' for a question: a seeded hash of its whitespace-normalized text.

    Hashing the text (not the position or the id) makes the split independent of ``n`` and of file order, and
    puts duplicate questions on the same side, so train and held-out never overlap in content.
    """
    key = " ".join(question.split())
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "heldout" if u < heldout_fraction else "train"


def load_problems(task: TaskConfig) -> list[Problem]:
    """The problems a task selects: its source, then its split (seeded), then the first ``n``.

    Raises PluribusError for a missing file, a bad field mapping, an unknown level, or an empty selection.
    """
    if task.source == "synthetic":
        want = task.n or DEFAULT_SYNTHETIC_N
        chosen = []
        for p in synthetic(task.synthetic, seed=task.seed):
            if task.split == "all" or split_of(p.question, task.seed, task.heldout_fraction) == task.split:
                chosen.append(p)
                if len(chosen) >= want:
                    break
        if task.n is not None and 0 < len(chosen) < want:
            # a level has finitely many distinct problems; say so rather than quietly run fewer
            logging.getLogger(__name__).warning(
                "task.n=%d but synthetic level '%s' has only %d distinct %s problems; running those "
                "(a harder level or another heldout_fraction gives more)", want, task.synthetic.level or "(custom)", len(chosen),
                task.split)
    else:
        chosen = [
            p for p in load_source(task)
            if task.split == "all" or split_of(p.question, task.seed, task.heldout_fraction) == task.split
        ]
        if task.n is not None:
            chosen = chosen[: task.n]
    if not chosen:
        raise PluribusError(
            f"task selects no problems (source={task.source}, split={task.split}, "
            f"heldout_fraction={task.heldout_fraction}); use a larger source or another split"
        )
    return chosen


def load_source(task: TaskConfig) -> list[Problem]:
    """Every problem of a non-synthetic source, in source order."""
    if task.source == "gsm8k":
        return load_gsm8k(task.path, split=task.hf_split, subset=task.subset)
    if task.source == "synthetic":
        return list(synthetic(task.synthetic, seed=task.seed, limit=task.n or DEFAULT_SYNTHETIC_N))
    if not task.path:
        raise PluribusError(f"task.source={task.source} needs task.path (a file or a Hub dataset id)")
    return load_table(
        task.path,
        task.fields,
        multiple_choice=task.source == "mc",
        kind=None if task.source == "mc" else task.source,
        subset=task.subset,
        hf_split=task.hf_split,
    )


# --------------------------------------------------------------------------------------------- GSM8K


def clean_gsm8k_solution(text: str) -> tuple[str, str]:
    """A GSM8K answer field -> (solution, answer).

    The solution keeps one step per line with the ``<<48/2=24>>`` calculator annotations removed and ends with
    the ``#### N`` line; the answer is N normalized ("1,200" -> "1200").
    """
    if "####" not in text:
        raise ValueError("a GSM8K solution ends with '#### <answer>'")
    body, final = text.rsplit("####", 1)
    steps = [re.sub(r"\s+", " ", re.sub(r"<<[^>]*>>", "", line)).strip() for line in body.splitlines()]
    final = final.strip()
    answer = normalize_answer(final) or final
    return "\n".join([s for s in steps if s] + [f"#### {final}"]), answer


def default_gsm8k_path() -> Path:
    """The local GSM8K training file: $PLURIBUS_GSM8K, else ``../shared/data/gsm8k/train.jsonl`` beside the repo."""
    env = os.environ.get(GSM8K_ENV)
    if env:
        p = Path(env).expanduser()
        p = p / "train.jsonl" if p.is_dir() else p
        if not p.is_file():
            raise PluribusError(f"{GSM8K_ENV}={env} is not a GSM8K jsonl file; point it at train.jsonl")
        return p
    repo = Path(__file__).resolve().parents[2]
    for base in (repo, Path.cwd()):
        p = base.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
        if p.is_file():
            return p
    raise PluribusError(
        f"GSM8K not found: set {GSM8K_ENV}=/path/to/train.jsonl, set task.path to the file, "
        f"or use task.path={GSM8K_HUB} when online"
    )


def load_gsm8k(path: str | os.PathLike[str] | None = None, *, split: str = "train", subset: str | None = None) -> list[Problem]:
    """GSM8K problems from a local jsonl (default: see ``default_gsm8k_path``) or ``openai/gsm8k`` on the Hub.

    Ids are ``gsm8k-<split>-<line:06d>``; ``solution`` is the cleaned worked solution, ``answer`` the ``####`` value.
    """
    if path is not None and str(path) == GSM8K_HUB:
        rows = _hub_rows(GSM8K_HUB, subset or "main", split)
        places = [f"{GSM8K_HUB} record {i}" for i in range(1, len(rows) + 1)]
        name = split
    else:
        file = default_gsm8k_path() if path is None else Path(path).expanduser()
        if file.is_dir():
            file = file / f"{split}.jsonl"
        if not file.is_file():
            raise PluribusError(f"GSM8K file '{file}' does not exist; set task.path to GSM8K's train.jsonl")
        numbered = _read_jsonl(file)
        rows = [row for _, row in numbered]
        places = [f"{file} line {lineno}" for lineno, _ in numbered]
        name = file.name.split(".")[0]
    problems = []
    for i, (row, where) in enumerate(zip(rows, places, strict=True)):
        if "question" not in row or "answer" not in row or "####" not in str(row["answer"]):
            raise PluribusError(f"GSM8K {where} has no question / answer with '#### N'; is this GSM8K?")
        solution, answer = clean_gsm8k_solution(row["answer"])
        problems.append(
            Problem(
                id=f"gsm8k-{name}-{i:06d}",
                question=_text(row["question"], "question", where),
                answer=_text(answer, "answer", where),
                solution=solution,
                source="gsm8k",
                meta={},
            )
        )
    return problems


# --------------------------------------------------------------------------------- tables (any source)

FIELD_DEFAULTS: dict[str, tuple[str, ...]] = {
    "question": ("question", "problem", "prompt", "input", "query"),
    "answer": ("answer", "answerKey", "final_answer", "target", "label", "output"),
    "solution": ("solution", "rationale", "explanation"),
    "choices": ("choices", "options"),
    "id": ("id",),
}


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number from 1, object) of each non-blank line. A UTF-8 byte-order mark (Windows editors write
    one) is skipped; bytes that are not UTF-8 are one PluribusError naming the file, line and byte offset."""
    rows = []
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, start = raw[3:], 3
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PluribusError(f"{path} is not UTF-8 text: line {lineno}, byte offset {start + e.start} "
                                    f"({raw[e.start:e.start + 1]!r}); save it as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise PluribusError(f"{path}: line {lineno} is not valid JSON") from None
            if not isinstance(row, dict):
                raise PluribusError(f"{path}: line {lineno} is not a JSON object")
            rows.append((lineno, row))
    return rows


def _hub_rows(dataset_id: str, subset: str | None, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, subset, split=split)
    except Exception as e:  # offline, not cached, no such dataset/split: all one message for the user
        raise PluribusError(
            f"could not load '{dataset_id}' (subset={subset}, split={split}) from the Hugging Face Hub: "
            f"{type(e).__name__}; offline it must already be cached; use a local file in task.path instead"
        ) from None
    return list(ds)


def _read_rows(path: str, kind: str | None, subset: str | None, hf_split: str
               ) -> tuple[list[dict[str, Any]], str, list[str]]:
    """Rows of a jsonl / parquet file or a Hub dataset, a short name for ids, and where each row is, for
    messages: "line 7" of a jsonl, "record 7" otherwise, both counted from 1 as editors and viewers count."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if kind is None:  # multiple choice: any of the three, by the path's look
        kind = "jsonl" if suffix in (".jsonl", ".json") else "parquet" if suffix == ".parquet" else "hf"
    if kind == "jsonl" and p.is_file():
        numbered = _read_jsonl(p)
        return [row for _, row in numbered], p.stem, [f"{path} line {n}" for n, _ in numbered]
    rows, name = _read_table_rows(p, path, kind, subset, hf_split)
    return rows, name, [f"{path} record {i}" for i in range(1, len(rows) + 1)]


def _read_table_rows(p: Path, path: str, kind: str, subset: str | None, hf_split: str
                     ) -> tuple[list[dict[str, Any]], str]:
    if kind in ("jsonl", "parquet"):
        if not p.is_file():
            raise PluribusError(f"task.path '{path}' is not a file; give the path of a .{kind} file")
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist(), p.stem
        except Exception as e:
            raise PluribusError(f"task.path '{path}' is not a readable parquet file ({type(e).__name__})") from None
    if p.exists():  # a dataset saved with save_to_disk, or a folder of data files
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
            ds = ds[hf_split] if isinstance(ds, datasets.DatasetDict) else ds
        except Exception:
            return _hub_rows(str(p), subset, hf_split), p.name
        return list(ds), p.name
    return _hub_rows(path, subset, hf_split), path.rstrip("/").split("/")[-1]


def _column(row: dict[str, Any], name: str, fields: dict[str, str], required: bool, where: str) -> Any:
    if name in fields:
        col = fields[name]
        if name == "choices" and "," in col:  # choices spread over columns: "A,B,C,D"
            cols = [c.strip() for c in col.split(",")]
            missing = [c for c in cols if c not in row]
            if missing:
                raise PluribusError(f"{where}: no column {missing[0]!r} for choices; columns are {sorted(row)}")
            return [row[c] for c in cols]
        if col not in row:
            raise PluribusError(f"{where}: no column {col!r} (task.fields.{name}); columns are {sorted(row)}")
        return row[col]
    for col in FIELD_DEFAULTS[name]:
        if col in row:
            return row[col]
    if required:
        raise PluribusError(
            f"{where}: no {name} column (tried {', '.join(FIELD_DEFAULTS[name])}); "
            f"map one with task.fields.{name}=<column>; columns are {sorted(row)}"
        )
    return None


def _choices_of(value: Any, where: str) -> tuple[list[str], list[str] | None]:
    """Option texts and, when the source labels them (ARC: {text: [...], label: [...]}), the labels."""
    if isinstance(value, dict) and "text" in value:
        labels = value.get("label")
        return [str(t) for t in value["text"]], [str(x) for x in labels] if labels is not None else None
    if isinstance(value, list | tuple) and value:
        return [str(t) for t in value], None
    raise PluribusError(f"{where}: choices must be a non-empty list (or {{text, label}}), got {type(value).__name__}")


# what prints as nothing: whitespace, format characters (zero-width space / joiners, word joiner, BOM: Cf) and
# control characters; a text made only of these is empty to the reader and to the model asked it
_INVISIBLE = {"Cf", "Cc", "Zs", "Zl", "Zp"}


def blank(text: str) -> bool:
    """Whether ``text`` shows nothing: every character whitespace or invisible (Unicode Cf, Cc, Z*)."""
    import unicodedata

    return all(ch.isspace() or unicodedata.category(ch) in _INVISIBLE for ch in text)


def _text(value: Any, name: str, where: str) -> str:
    """A question or gold answer as stripped text; null, empty or invisible-only (``blank``) is refused, naming
    the record."""
    if value is None:
        raise PluribusError(f"{where}: {name} is null; give every record a {name} (or drop the record)")
    text = str(value).strip()
    if not text:
        raise PluribusError(f"{where}: {name} is empty; give every record a {name} (or drop the record)")
    if blank(text):
        codes = " ".join(f"U+{ord(ch):04X}" for ch in dict.fromkeys(text))
        raise PluribusError(f"{where}: {name} has only invisible characters ({codes}); give every record a "
                            f"{name} (or drop the record)")
    return text


def _present(row: dict[str, Any], name: str, fields: dict[str, str]) -> bool:
    """Whether ``row`` has a column for ``name`` (mapped or by a default name), whatever its value."""
    if name in fields:
        return fields[name] in row
    return any(col in row for col in FIELD_DEFAULTS[name])


def _gold(value: Any) -> str:
    """A gold answer as stored: numbers normalized ("1,200" -> "1200"), anything else stripped text."""
    text = str(value).strip()
    norm = normalize_answer(text)
    if norm is not None and re.fullmatch(r"-?\d+(?:\.\d+)?(?:/\d+)?", norm):
        return norm
    return text


def load_table(
    path: str,
    fields: dict[str, str] | None = None,
    *,
    multiple_choice: bool = False,
    kind: str | None = "jsonl",
    subset: str | None = None,
    hf_split: str = "train",
) -> list[Problem]:
    """Problems from any jsonl / parquet file or Hub dataset, with columns named by ``fields``.

    ``fields`` maps question / answer / solution / choices / id to column names; unmapped ones are looked up
    under common names (FIELD_DEFAULTS). An answer holding "#### N" is split into solution and answer; with no
    answer column, the answer is extracted from the solution. Multiple choice (``choices`` present or
    ``multiple_choice``): options are appended to the question as "A) ...", kept in ``meta['choices']``, and the
    answer becomes the gold letter (from a letter, a 0-based index, a source label or the option's text).
    """
    fields = dict(fields or {})
    unknown = set(fields) - set(FIELD_DEFAULTS)
    if unknown:
        raise PluribusError(f"task.fields has unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(FIELD_DEFAULTS)}")
    rows, name, places = _read_rows(path, kind, subset, hf_split)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name) or "data"
    return [_problem(row, where, i, name, fields, multiple_choice)
            for i, (row, where) in enumerate(zip(rows, places, strict=True))]


def _problem(row: dict[str, Any], where: str, i: int, name: str, fields: dict[str, str], multiple_choice: bool) -> Problem:
    """Row ``i`` of table ``name`` (at ``where``, for errors) as a Problem: ``load_table``'s rules."""
    question = _text(_column(row, "question", fields, True, where), "question", where)
    raw_choices = _column(row, "choices", fields, multiple_choice, where)
    answer = _column(row, "answer", fields, raw_choices is not None, where)
    solution = _column(row, "solution", fields, False, where)
    rid = _column(row, "id", fields, False, where)
    if answer is None and _present(row, "answer", fields):
        _text(answer, "answer", where)  # a null in the answer column is not a missing column
    meta: dict[str, Any] = {}
    if raw_choices is not None:
        question, meta["choices"], answer_text = _with_choices(question, raw_choices, answer, where)
    elif answer is None and solution is not None:
        found = extract_answer(str(solution))
        if found is None or found.method == "last_number":
            raise PluribusError(f"{where}: no answer column and no marked answer in the solution; map task.fields.answer")
        answer_text = found.value
    elif answer is None:
        raise PluribusError(f"{where}: no answer column; map one with task.fields.answer=<column>")
    elif isinstance(answer, str) and "####" in answer:
        solution, answer_text = clean_gsm8k_solution(answer)
    else:
        answer_text = _gold(_text(answer, "answer", where))
    pid = f"{name}-{rid}" if rid is not None and str(rid).strip() else f"{name}-{i:06d}"
    return Problem(
        id=pid,
        question=question,
        answer=_text(answer_text, "answer", where),
        solution=None if solution is None else str(solution),
        source=name,
        meta=meta,
    )


def _with_choices(question: str, raw_choices: Any, answer: Any, where: str) -> tuple[str, list[str], str]:
    """(the question with its options appended as "A) ...", the options, the gold letter) of a multiple-choice
    row; the gold comes from a source label, a letter, a 0-based index or the option's text."""
    choices, labels = _choices_of(raw_choices, where)
    key = str(answer).strip() if answer is not None else ""
    if labels and key in labels:
        gold = LETTERS[labels.index(key)]
    else:
        gold = gold_choice(answer if isinstance(answer, int) else key, choices)
    if gold is None:
        raise PluribusError(f"{where}: answer {answer!r} is not a letter, index or text of its {len(choices)} choices")
    return f"{question}\n\n" + "\n".join(f"{LETTERS[j]}) {c}" for j, c in enumerate(choices)), choices, gold


# ------------------------------------------------------------------------------------------ synthetic

_PEOPLE = [
    ("Mia", "she", "her", "her"), ("Liam", "he", "him", "his"), ("Ava", "she", "her", "her"),
    ("Noah", "he", "him", "his"), ("Zoe", "she", "her", "her"), ("Omar", "he", "him", "his"),
    ("Lena", "she", "her", "her"), ("Ravi", "he", "him", "his"), ("Sofia", "she", "her", "her"),
    ("Jack", "he", "him", "his"),
]  # fmt: skip
_ITEMS = [
    ("apple", "apples"), ("marble", "marbles"), ("sticker", "stickers"), ("book", "books"), ("coin", "coins"),
    ("pencil", "pencils"), ("card", "cards"), ("shell", "shells"), ("stamp", "stamps"), ("cookie", "cookies"),
]  # fmt: skip
# (question sentence, solution sentence) per operator; {x} the operand, {a} the value before, {r} after.
_WORD_STEPS = {
    "+": [
        ("{S} buys {x} more {X}.", "{S} buys {x} more: {a} + {x} = {r} {R}."),
        ("{S} finds {x} more {X}.", "{S} finds {x} more: {a} + {x} = {r} {R}."),
        ("A friend gives {O} {x} more {X}.", "A friend gives {O} {x} more: {a} + {x} = {r} {R}."),
    ],
    "-": [
        ("{S} gives away {x} {X}.", "{S} gives away {x}: {a} - {x} = {r} {R}."),
        ("{S} sells {x} {X}.", "{S} sells {x}: {a} - {x} = {r} {R}."),
        ("{S} loses {x} {X}.", "{S} loses {x}: {a} - {x} = {r} {R}."),
    ],
    "*": [
        ("Then {s} gets {x} times as many {items} as {s} has.", "{x} times as many: {a} * {x} = {r} {R}."),
        ("Then {P} pile of {items} grows to {x} times its size.", "{x} times its size: {a} * {x} = {r} {R}."),
    ],
}


def resolve_level(cfg: SyntheticConfig) -> tuple[str, SyntheticConfig]:
    """(level name, effective config): a named level replaces the other fields; no level gives 'custom<hash>'."""
    if cfg.level is None:
        params = cfg.model_dump(mode="json", exclude={"level"})
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]
        return f"custom{digest}", cfg
    if cfg.level not in LEVELS:
        raise PluribusError(unknown_name("synthetic level", cfg.level, LEVELS))
    return cfg.level, SyntheticConfig(level=cfg.level, **LEVELS[cfg.level])


def _operand(rng: random.Random, digits: int, op: str) -> int:
    lo = 10 ** (digits - 1) if digits > 1 else (2 if op == "*" else 1)  # x1 and +0 make trivial steps
    return rng.randint(lo, 10**digits - 1)


def _word(n: int, item: tuple[str, str]) -> str:
    return f"{n} {item[0] if n == 1 else item[1]}"


def synthetic_problem(cfg: SyntheticConfig, seed: int, index: int, level: str | None = None) -> Problem:
    """Problem ``index`` of the synthetic stream for (cfg, seed): the same on every call and every machine.

    A problem applies ``k`` operations (k in min_steps..steps) to a starting number, left to right; subtraction
    never goes below zero. ``solution`` has one line per operation ("7 + 5 = 12", or a sentence holding it in
    word problems) and ends with "#### N", like GSM8K.
    """
    name = level or resolve_level(cfg)[0]
    rng = random.Random(int.from_bytes(hashlib.sha256(f"synth\x00{name}\x00{seed}\x00{index}".encode()).digest()[:8], "big"))
    k = rng.randint(min(cfg.min_steps or cfg.steps, cfg.steps), cfg.steps)
    value = _operand(rng, cfg.first_digits or cfg.digits, "+")
    start = value
    trace: list[tuple[str, int, int, int]] = []  # (op, before, operand, after)
    for _ in range(k):
        op = rng.choice(list(cfg.ops))
        x = _operand(rng, cfg.digits, op)
        if op == "-" and x > value:
            lo = 10 ** (cfg.digits - 1) if cfg.digits > 1 else 1
            if value >= lo:
                x = rng.randint(lo, value)
            else:
                op = "+"
        after = value + x if op == "+" else value - x if op == "-" else value * x
        trace.append((op, value, x, after))
        value = after
    if cfg.style == "expression":
        expr = str(start)
        for op, _, x, _ in trace:
            if op == "*" and re.search(r"[+-]", expr):
                expr = f"({expr})"
            expr = f"{expr} {op} {x}"
        question = f"What is {expr}?"
        lines = [f"{a} {op} {x} = {r}" for op, a, x, r in trace]
    else:
        who, s, o, poss = rng.choice(_PEOPLE)
        item = rng.choice(_ITEMS)
        sentences, lines = [f"{who} has {_word(start, item)}."], []
        for op, a, x, r in trace:
            q, sol = rng.choice(_WORD_STEPS[op])
            fill = {"S": s.capitalize(), "s": s, "O": o, "P": poss, "x": x, "a": a, "r": r, "items": item[1]}
            sentences.append(q.format(X=item[0] if x == 1 else item[1], R=item[0] if r == 1 else item[1], **fill))
            lines.append(sol.format(R=item[0] if r == 1 else item[1], **fill))
        sentences.append(f"How many {item[1]} does {who} have now?")
        question = " ".join(sentences)
    return Problem(
        id=f"synth-{name}-{seed}-{index}",
        question=question,
        answer=str(value),
        solution="\n".join([*lines, f"#### {value}"]),
        source="synthetic",
        meta={"level": name, "steps": k, "ops": [t[0] for t in trace], "style": cfg.style, "seed": seed, "index": index},
    )


def synthetic(cfg: SyntheticConfig, *, seed: int = 0, limit: int | None = None) -> Iterator[Problem]:
    """The synthetic stream: problems 0, 1, 2, ... with repeated questions skipped.

    Small levels have few distinct questions (81 one-digit additions); the stream ends when no new question
    has turned up in a long while, or after ``limit`` problems.
    """
    name, eff = resolve_level(cfg)
    seen: set[str] = set()
    misses = 0
    index = 0
    while limit is None or len(seen) < limit:
        p = synthetic_problem(eff, seed, index, level=name)
        index += 1
        if p.question in seen:
            misses += 1
            if misses > 2000 + 4 * len(seen):  # the space of distinct questions is (nearly) exhausted
                return
            continue
        misses = 0
        seen.add(p.question)
        yield p
