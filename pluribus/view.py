"""`pluribus view`: one self-contained HTML page of a run folder, to read a run instead of its JSONL.

The page (pluribus.view_page's template) holds everything inline: the eval report with its plots as data URIs,
every trajectory store's problems round by round (each agent's answer, right or wrong, who changed their mind and
which way, counted as the debate's summary counts them; the judge's turns; the final vote by answers.vote_key),
the process rows with each step's Monte-Carlo score and label (and PRM score where a row has one), each expert's
training curve, each merge's report, the stages run and the recipe. The data is embedded as
JSON and rendered by a small inline script page by page, so a run of thousands of problems stays usable; nothing is
fetched, so it opens from disk with no server and no network. A part the run does not have yet is shown as absent.
Every string passes through pluribus.public.redact (tokens, URL credentials): the page may be shared as a file.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from pluribus.errors import PluribusError
from pluribus.layout import RunLayout

# what makes a folder a run: any one of these (a run stopped after its debate has only the first two)
RUN_MARKERS = ("recipe.yaml", "stages.json", "trajectories", "eval", "adapters", "merged")
CURVE_KEYS = ("loss", "eval_loss", "reward", "accuracy", "prm_score", "kl", "learning_rate", "grad_norm")


def check_run(run: Path) -> RunLayout:
    """The run's layout, or a PluribusError naming why ``run`` is not a run folder."""
    if not run.is_dir():
        raise PluribusError(f"'{run}' is not a folder; give a run folder such as runs/quickstart")
    if not any((run / m).exists() for m in RUN_MARKERS):
        raise PluribusError(f"'{run}' is not a run folder (it has none of {', '.join(RUN_MARKERS)}); give a run "
                            "folder such as runs/quickstart")
    return RunLayout(run)


# ------------------------------------------------------------------------------------------- the parts


def _read_json(path: Path) -> Any:
    """A JSON file, or None if it is missing or unreadable (the page shows that part as absent)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rel(path: Path, run: Path) -> str:
    try:
        return str(path.relative_to(run))
    except ValueError:
        return str(path)


def _num(value: Any) -> float:
    """A count from a record as a number (the page prints it as is)."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _same(a: str | None, b: str | None) -> bool:
    """Whether two answers are one vote (the debate's own rule: "0.5" and "1/2" are one answer)."""
    from pluribus.data.answers import vote_key

    return a == b or (a is not None and b is not None and vote_key(a) == vote_key(b))


def _turn(t: dict[str, Any], before: dict[str, Any] | None) -> dict[str, Any]:
    """One turn as the page draws it; ``ch`` is how the agent moved since its previous round: "fixed" (wrong or
    unparsable, then right), "broke" (right, then wrong or unparsable), "switched" (another answer, neither right),
    "" (the same answer, however written, or right both times)."""
    change = ""
    if before is not None:  # fixed and broke as the debate's summary counts them (corrected, lost)
        right, was_right = bool(t.get("correct")), bool(before.get("correct"))
        change = "fixed" if right and not was_right else "broke" if was_right and not right else \
            "switched" if not right and not _same(t.get("answer"), before.get("answer")) else ""
    return {"a": t.get("answer"), "c": t.get("correct"), "r": t.get("response", ""), "t": _num(t.get("tokens_out")),
            "ch": change, "cut": (t.get("meta") or {}).get("finish_reason") == "length"}


def _votes(turns: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """The last round's answers counted as the debate's majority counts them (by answers.vote_key), each written as
    its first voter wrote it, most votes first; unparsable answers counted apart."""
    from pluribus.data.answers import vote_key

    shown: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for t in turns:
        key = "\0none" if t["a"] is None else vote_key(t["a"])
        shown.setdefault(key, "(unparsable)" if t["a"] is None else str(t["a"]))
        counts[key] += 1
    return [(shown[k], n) for k, n in counts.most_common()]


def _problem(rec: dict[str, Any]) -> dict[str, Any]:
    """A trajectory as the page's debate view: rounds of turns with their changes, the judge's turns (star topology,
    judge aggregation), the last round's vote."""
    rounds, last = [], None
    for rnd in rec["rounds"]:
        before = {t.get("agent"): t for t in last or []}
        rounds.append([_turn(t, before.get(t.get("agent"))) for t in rnd])
        last = rnd
    meta = rec.get("meta") or {}
    judge = [{**_turn(t, None), "round": t.get("round")} for t in meta.get("judge") or [] if isinstance(t, dict)]
    changes = Counter(t["ch"] for rnd in rounds for t in rnd if t["ch"])
    return {"id": rec["problem_id"], "q": rec["question"], "gold": rec["gold"], "agents": rec["team"],
            "rounds": rounds, "judge": judge, "final": rec.get("final_answer"), "ok": rec.get("final_correct"),
            "agg": rec.get("aggregation", ""), "votes": _votes(rounds[-1]) if rounds else [],
            "tie": bool(meta.get("tie_broken")), "stopped": meta.get("stopped_after_round"),
            "fixed": changes["fixed"], "broke": changes["broke"], "switched": changes["switched"],
            "tokens": _num((rec.get("cost") or {}).get("tokens_out"))}


def _lines(data: bytes) -> int:
    """Lines in a shard, a torn last one (no newline) included."""
    return data.count(b"\n") + (bool(data) and not data.endswith(b"\n"))


def _stores(run: Path) -> list[dict[str, Any]]:
    """Every trajectory store of the run (the debate, the single agent's own samples, each eval system), the
    debate first; lines that are not whole records (a writer still running, a torn line) are counted, not shown."""
    from pluribus.data.records import Trajectory
    from pluribus.data.store import TrajectoryStore

    folders = sorted((m.parent for m in run.rglob("trajectories/manifest.json")),
                     key=lambda p: (p != run / "trajectories", p != run / "self" / "trajectories", str(p)))
    out = []
    for folder in folders:
        name = "debate" if folder == run / "trajectories" else _rel(folder.parent, run)
        try:
            store = TrajectoryStore(folder, check=Trajectory.from_dict)  # read-only: no lock, no repair
            records = list(store.iter_records(skip_corrupt=True))
        except PluribusError as e:
            out.append({"name": name, "path": str(folder), "error": str(e), "problems": []})
            continue
        lines = sum(_lines(shard.read_bytes()) for shard in store.shards())
        problems = [_problem(r) for r in records]
        shapes = {(len(p["agents"]), len(p["rounds"])) for p in problems}
        note = ""
        if len(shapes) == 1 and (shape := shapes.pop())[0] > 1 and shape[1] == 1 and \
                {p["agg"] for p in problems} == {"majority"}:
            # sc's draws, the single agent's own samples: no debate, and eval's sc does not vote over all of them
            note = (f"{shape[0]} independent samples per problem, no debate: the final answer here is the majority "
                    "of all of them" + ("; eval's sc votes over as many as fit the team's token budget (the eval "
                                        "report has its accuracy)" if name.startswith("eval") else ""))
        out.append({"name": name, "path": str(folder), "problems": problems, "note": note,
                    "unreadable": lines - len(records) - len(store.duplicates),
                    "duplicates": len(store.duplicates)})
    return out


def _parquet_rows(folder: Path) -> list[dict[str, Any]] | None:
    import pyarrow.parquet as pq

    files = sorted((folder / "data").glob("*.parquet"))
    if not files:
        return None
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def _text(prompt: Any) -> str:
    """A row's prompt as text: a string as is, a conversation (TRL's conversational form) as its turns' contents."""
    if isinstance(prompt, list):
        return "\n\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in prompt)
    return "" if prompt is None else str(prompt)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _score(x: Any) -> float | None:
    """A per-step score for the page: a finite number, else None (the page says n/a)."""
    return float(x) if _is_number(x) and math.isfinite(x) else None


def _process(layout: RunLayout) -> list[dict[str, Any]]:
    """The process datasets' rows (the team's, then the single agent's own): steps with their labels, Monte-Carlo
    scores, debate signals, and any other per-step score a row carries (a PRM's, named by its column)."""
    out = []
    for data in ("team", "self"):
        folder = layout.dataset("process", data)
        rows = _parquet_rows(folder)
        if rows is None:
            continue
        shown = []
        for r in rows:
            steps = [str(x) for x in r.get("completions") or []]
            extra = {k: [_score(x) for x in v] for k, v in r.items()
                     if k not in ("completions", "labels", "scores", "debate") and isinstance(v, list)
                     and len(v) == len(steps) and all(x is None or _is_number(x) for x in v)
                     and any(_is_number(x) for x in v)}
            # a label as good / bad (TRL's booleans, or 1 / 0), None where a row has none for a step
            labels = [None if x is None else bool(x) for x in r.get("labels") or []]
            rnd = r.get("round")
            shown.append({"id": str(r.get("problem_id") or ""), "prompt": _text(r.get("prompt")), "steps": steps,
                          "labels": labels + [None] * (len(steps) - len(labels)),
                          "scores": [_score(x) for x in r.get("scores") or []],
                          "debate": [str(x or "") for x in r.get("debate") or []], "extra": extra,
                          "agent": str(r.get("agent") or ""), "round": rnd if _is_number(rnd) else None})
        out.append({"name": "process" if data == "team" else "self/process", "path": str(folder), "rows": shown})
    return out


def _datasets(layout: RunLayout) -> list[dict[str, Any]]:
    """Each built dataset and its row count (from the parquet footers: no rows read)."""
    import pyarrow.parquet as pq

    out = []
    for data in ("team", "self"):
        root = layout.datasets(data)
        for folder in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
            files = sorted((folder / "data").glob("*.parquet"))
            if files:
                rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
                out.append({"name": folder.name if data == "team" else f"self/{folder.name}", "rows": rows,
                            "path": str(folder)})
    return out


def _history(adapter: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    """The logged steps of a training: its record's log_history, else the latest checkpoint's trainer_state."""
    if isinstance(record.get("log_history"), list):
        return record["log_history"]
    from pluribus.distill.output import checkpoints_dir

    states = sorted((p for p in checkpoints_dir(adapter).glob("checkpoint-*/trainer_state.json")
                     if re.fullmatch(r"checkpoint-\d+", p.parent.name)), key=lambda p: int(p.parent.name[11:]))
    state = _read_json(states[-1]) if states else None
    return state.get("log_history", []) if isinstance(state, dict) else []


def _experts(run: Path) -> list[dict[str, Any]]:
    """Each adapter folder with a training record: objective, base, data, final metrics, and its curves; a training
    still running (its checkpoints, no adapter folder yet) with the curve of its latest checkpoint."""
    out = []
    root = run / "adapters"
    folders = {p.name[: -len(".checkpoints")] if p.name.endswith(".checkpoints") else p.name
               for p in root.glob("*") if p.is_dir()} if root.is_dir() else set()
    for folder in (root / name for name in sorted(folders)):
        record = _read_json(folder / "training_record.json")
        running = not folder.is_dir()  # checkpoints only: a training still running (or stopped before its end)
        if running:
            record = {}
            if not _history(folder, record):
                continue
        elif not isinstance(record, dict):
            out.append({"name": folder.name, "path": str(folder), "absent": "no readable training_record.json"})
            continue
        curves: dict[str, list[list[float]]] = {}
        undrawn: Counter[str] = Counter()  # logged values that are nan or inf (a diverged step): counted, not drawn
        for entry in _history(folder, record):
            step = entry.get("step")
            for key in CURVE_KEYS:
                value = entry.get(key)
                if not (_is_number(step) and _is_number(value)):
                    continue
                if math.isfinite(value):
                    curves.setdefault(key, []).append([step, value])
                else:
                    undrawn[key] += 1
        out.append({"name": folder.name, "path": str(folder.with_name(folder.name + ".checkpoints") if running else folder),
                    "objective": record.get("objective"),
                    "base": record.get("base_model"), "data": record.get("data") or {},
                    "dataset": (record.get("dataset") or {}).get("path"), "metrics": record.get("metrics") or {},
                    "finished": record.get("finished_at"), "curves": curves, "undrawn": dict(undrawn),
                    "running": running})
    return out


def _merges(run: Path) -> list[dict[str, Any]]:
    """Each merge folder: its report's lines (as `pluribus merge` printed them) and its merge recipe."""
    from pluribus.merge import MergeSummary

    out = []
    root = run / "merged"
    for folder in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        report = _read_json(folder / "merge_report.json")
        lines: list[str] = []
        if isinstance(report, dict):
            try:
                lines = MergeSummary(**report).lines()
            except TypeError:  # a report of another version: its fields as they are
                lines = [f"{k}: {v}" for k, v in report.items()]
        out.append({"name": folder.name, "path": str(folder), "lines": lines,
                    "report": report if isinstance(report, dict) else None,
                    "report_file": (folder / "merge_report.json").is_file(),
                    "spec": _yaml_shown(folder / "merge.yaml")})
    return out


def _eval(layout: RunLayout) -> dict[str, Any] | None:
    """The eval report as HTML with its plots inlined, or None before the first eval."""
    folder = layout.eval
    report = folder / "report.md"
    if not report.is_file():
        return None
    images = {p.name: "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()
              for p in sorted(folder.glob("*.png"))}
    body, used = markdown_html(report.read_text(), images)
    extra = "".join(f'<figure><img alt="{html.escape(n)}" src="{src}"><figcaption>{html.escape(n)}</figcaption>'
                    "</figure>" for n, src in images.items() if n not in used)
    return {"html": body + extra, "path": str(report)}


def _stages(layout: RunLayout) -> list[dict[str, Any]]:
    done = _read_json(layout.stages)
    if not isinstance(done, dict):
        return []
    return [{"step": k, "finished": v.get("finished"), "output": v.get("output")} for k, v in done.items()
            if isinstance(v, dict)]


def _yaml_shown(path: Path) -> str | None:
    """A YAML file as the page shows it (the recipe, a merge.yaml): values under secret-looking keys (an api_key, a
    token) replaced by ***; None if it is missing."""
    import yaml

    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        # not its text: a key under a secret-looking name could only be hidden in a file that parses
        return f"({path} is not readable YAML ({type(e).__name__}); not shown)"
    return yaml.safe_dump(_hide_secrets(data), sort_keys=False)


def _hide_secrets(data: Any, key: str = "") -> Any:
    from pluribus.public import is_secret_key

    if isinstance(data, dict):
        return {k: _hide_secrets(v, str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [_hide_secrets(v, key) for v in data]
    return "***" if isinstance(data, str) and data and is_secret_key(key) else data


def _redacted(data: Any) -> Any:
    """Every string of ``data`` with tokens and URL credentials removed (pluribus.public.redact); a nan or inf
    (a diverged loss, an undefined metric) as its name, "nan", "inf", "-inf": JSON has no such number, and one
    would make the whole page's data unreadable to the browser."""
    from pluribus.public import redact

    if isinstance(data, dict):
        return {k: _redacted(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_redacted(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    return redact(data) if isinstance(data, str) else data


def collect(run: Path) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data (absent parts are None or empty)."""
    layout = check_run(run)
    return _redacted({
        "run": {"name": run.resolve().name, "path": str(run.resolve()),
                "stages_unreadable": layout.stages.is_file() and not isinstance(_read_json(layout.stages), dict)},
        "recipe": _yaml_shown(layout.recipe), "stages": _stages(layout), "eval": _eval(layout), "stores": _stores(run),
        "datasets": _datasets(layout), "process": _process(layout), "experts": _experts(run),
        "merges": _merges(run),
    })


# ------------------------------------------------------------------------------------------- the page


_INLINE = [(re.compile(r"`([^`]+)`"), r"<code>\1</code>"), (re.compile(r"\*\*([^*]+)\*\*"), r"<b>\1</b>")]
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def _inline(text: str, images: dict[str, str], used: set[str]) -> str:
    text = html.escape(text, quote=False)
    for pattern, repl in _INLINE:
        text = pattern.sub(repl, text)

    def image(m: re.Match) -> str:
        src = images.get(m.group(2))
        if src is None:
            return f"[image {m.group(2)} not found]"
        used.add(m.group(2))
        return f'<img alt="{html.escape(m.group(1))}" src="{src}">'

    return _IMAGE.sub(image, text)


def markdown_html(text: str, images: dict[str, str]) -> tuple[str, set[str]]:
    """The subset of markdown pluribus's reports use (headings, paragraphs, pipe tables, images, inline code) as
    HTML, with images from ``images`` (name -> data URI); returns the HTML and the image names it used."""
    out: list[str] = []
    used: set[str] = set()
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = min(6, len(line) - len(line.lstrip("#")) + 1)  # the page's own title is the h1
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip(), images, used)}</h{level}>")
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, rows = block[0], [r for r in block[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r)]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c, images, used)}</th>" for c in head)
                       + "</tr></thead><tbody>" + "".join(
                           "<tr>" + "".join(f"<td>{_inline(c, images, used)}</td>" for c in r) + "</tr>" for r in rows)
                       + "</tbody></table>")
            continue
        elif line.strip():
            para = [line]
            while i + 1 < len(lines) and lines[i + 1].strip() and not lines[i + 1].startswith(("#", "|")):
                i += 1
                para.append(lines[i])
            out.append(f"<p>{_inline(' '.join(para), images, used)}</p>")
        i += 1
    return "\n".join(out), used


def page(data: dict[str, Any]) -> str:
    """The HTML page of ``collect``'s data: the template with the data as an inline JSON script."""
    from pluribus.view_page import TEMPLATE

    # no "<" at all in the script element's text (JSON's \u003c instead): neither "</script>" nor "<!--" (which
    # would let a later "</script>" stay inside it) can end or change it; ASCII only: no lone surrogate to encode
    payload = json.dumps(_redacted(data), ensure_ascii=True, allow_nan=False).replace("<", "\\u003c")
    parts = {"TITLE": html.escape(f"pluribus run {data['run']['name']}"), "DATA": payload}
    return re.sub(r"\{\{(TITLE|DATA)\}\}", lambda m: parts[m.group(1)], TEMPLATE)  # one pass: no part fills another


def write_view(run: Path, out: Path | None = None) -> Path:
    """Write the page of ``run`` to ``out`` (default ``<run>/view.html``) atomically; returns its path."""
    from pluribus.io import atomic_write_text

    data = collect(run)
    return atomic_write_text(out or run / "view.html", page(data))
