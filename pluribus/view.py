"""`pluribus view`: one self-contained HTML page of a run folder, to read a run instead of its JSONL.

The page (pluribus.view_page's template) holds everything inline: the eval report with its plots as data URIs,
every trajectory store's problems round by round (each agent's answer, right or wrong, who changed their mind and
which way, the final vote), the process rows with each step's Monte-Carlo score and label (and PRM score where a row
has one), each expert's training curve, each merge's report, the stages run and the recipe. The data is embedded as
JSON and rendered by a small inline script page by page, so a run of thousands of problems stays usable; nothing is
fetched, so it opens from disk with no server and no network. A part the run does not have yet is shown as absent.
Every string passes through pluribus.public.redact (tokens, URL credentials): the page may be shared as a file.
"""

from __future__ import annotations

import base64
import html
import json
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


def _turn(t: dict[str, Any], before: dict[str, Any] | None) -> dict[str, Any]:
    """One turn as the page draws it; ``ch`` is how the agent moved since its previous round."""
    change = ""
    if before is not None and t.get("answer") != before.get("answer"):
        change = ("fixed" if t.get("correct") and not before.get("correct") else
                  "broke" if before.get("correct") and not t.get("correct") else "switched")
    return {"a": t.get("answer"), "c": t.get("correct"), "r": t.get("response", ""), "t": t.get("tokens_out", 0),
            "ch": change, "cut": (t.get("meta") or {}).get("finish_reason") == "length"}


def _problem(rec: dict[str, Any]) -> dict[str, Any]:
    """A trajectory as the page's debate view: rounds of turns with their changes, the last round's vote."""
    rounds, last = [], None
    for rnd in rec["rounds"]:
        rounds.append([_turn(t, last[i] if last else None) for i, t in enumerate(rnd)])
        last = rnd
    changes = Counter(t["ch"] for rnd in rounds for t in rnd if t["ch"])
    votes = Counter("(unparsable)" if t["a"] is None else str(t["a"]) for t in rounds[-1])
    return {"id": rec["problem_id"], "q": rec["question"], "gold": rec["gold"], "agents": rec["team"],
            "rounds": rounds, "final": rec.get("final_answer"), "ok": rec.get("final_correct"),
            "agg": rec.get("aggregation", ""), "votes": votes.most_common(), "fixed": changes["fixed"],
            "broke": changes["broke"], "switched": changes["switched"],
            "tokens": (rec.get("cost") or {}).get("tokens_out", 0)}


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
        try:
            store = TrajectoryStore(folder, check=Trajectory.from_dict)  # read-only: no lock, no repair
            records = list(store.iter_records(skip_corrupt=True))
        except PluribusError as e:
            out.append({"name": _rel(folder.parent, run) or "debate", "path": str(folder), "error": str(e),
                        "problems": []})
            continue
        lines = sum(_lines(shard.read_bytes()) for shard in store.shards())
        name = "debate" if folder == run / "trajectories" else _rel(folder.parent, run)
        problems = [_problem(r) for r in records]
        shapes = {(len(p["agents"]), len(p["rounds"])) for p in problems}
        note = ""
        if len(shapes) == 1 and (shape := shapes.pop())[0] > 1 and shape[1] == 1:
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
            steps = r.get("completions") or []
            extra = {k: v for k, v in r.items() if k not in ("completions", "labels", "scores", "debate")
                     and isinstance(v, list) and len(v) == len(steps) and all(isinstance(x, int | float) for x in v)}
            shown.append({"id": str(r.get("problem_id") or ""), "prompt": _text(r.get("prompt")), "steps": steps,
                          "labels": r.get("labels") or [], "scores": r.get("scores") or [],
                          "debate": r.get("debate") or [], "extra": extra, "agent": r.get("agent", ""),
                          "round": r.get("round")})
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
    """Each adapter folder with a training record: objective, base, data, final metrics, and its curves."""
    out = []
    root = run / "adapters"
    for folder in sorted(p for p in root.glob("*") if p.is_dir() and not p.name.endswith(".checkpoints")) \
            if root.is_dir() else []:
        record = _read_json(folder / "training_record.json")
        if not isinstance(record, dict):
            out.append({"name": folder.name, "path": str(folder), "absent": "no readable training_record.json"})
            continue
        curves: dict[str, list[list[float]]] = {}
        for entry in _history(folder, record):
            step = entry.get("step")
            for key in CURVE_KEYS:
                value = entry.get(key)
                if isinstance(step, int | float) and isinstance(value, int | float):
                    curves.setdefault(key, []).append([step, value])
        out.append({"name": folder.name, "path": str(folder), "objective": record.get("objective"),
                    "base": record.get("base_model"), "data": record.get("data") or {},
                    "dataset": (record.get("dataset") or {}).get("path"), "metrics": record.get("metrics") or {},
                    "finished": record.get("finished_at"), "curves": curves})
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
        spec = folder / "merge.yaml"
        out.append({"name": folder.name, "path": str(folder), "lines": lines,
                    "report": report if isinstance(report, dict) else None,
                    "spec": spec.read_text() if spec.is_file() else None})
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


def _recipe(layout: RunLayout) -> str | None:
    """The recipe as run; values under secret-looking keys (an api_key, a token) are replaced by ***."""
    import yaml

    if not layout.recipe.is_file():
        return None
    try:
        data = yaml.safe_load(layout.recipe.read_text())
    except yaml.YAMLError:
        return layout.recipe.read_text()
    return yaml.safe_dump(_hide_secrets(data), sort_keys=False)


def _hide_secrets(data: Any, key: str = "") -> Any:
    from pluribus.public import is_secret_key

    if isinstance(data, dict):
        return {k: _hide_secrets(v, str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [_hide_secrets(v, key) for v in data]
    return "***" if isinstance(data, str) and data and is_secret_key(key) else data


def _redacted(data: Any) -> Any:
    """Every string of ``data`` with tokens and URL credentials removed (pluribus.public.redact)."""
    from pluribus.public import redact

    if isinstance(data, dict):
        return {k: _redacted(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_redacted(v) for v in data]
    return redact(data) if isinstance(data, str) else data


def collect(run: Path) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data (absent parts are None or empty)."""
    layout = check_run(run)
    return _redacted({
        "run": {"name": run.resolve().name, "path": str(run.resolve())},
        "recipe": _recipe(layout), "stages": _stages(layout), "eval": _eval(layout), "stores": _stores(run),
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

    # "</" cannot end the script element early once escaped; U+2028/9 are valid JSON but not valid JS source
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/").replace("\u2028", "\\u2028") \
        .replace("\u2029", "\\u2029")
    title = html.escape(f"pluribus run {data['run']['name']}")
    return TEMPLATE.replace("{{TITLE}}", title).replace("{{DATA}}", payload)


def write_view(run: Path, out: Path | None = None) -> Path:
    """Write the page of ``run`` to ``out`` (default ``<run>/view.html``) atomically; returns its path."""
    from pluribus.io import atomic_write_text

    data = collect(run)
    return atomic_write_text(out or run / "view.html", page(data))
