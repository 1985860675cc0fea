"""Dataset cards: the README.md beside each built dataset (source run, config, counts, label statistics)."""

from __future__ import annotations

from typing import Any

import yaml

HOW = {
    "rsft": "Reasoning SFT: per problem, the final-round responses of the agents whose answer is verified "
            "correct, as a user/assistant chat; identical responses are kept once.",
    "augmented": "Trajectory augmentation: up to k correct traces per problem chosen for diversity "
                 "(greedy farthest-first by word n-gram overlap), plus corrective traces: an agent wrong in "
                 "round r-1 and right in round r, rewritten as a single-agent self-correction transcript "
                 "(first attempt, a check, the corrected answer). `kind` tells them apart.",
    "process": "Process supervision (stepwise supervision: `prompt`, `completions`, `labels`): solutions split "
               "into steps, each scored by Monte-Carlo rollouts from its prefix (`scores` = fraction of rollouts "
               "reaching the target answer), the last step by the trace's own final answer (Math-Shepherd); "
               "`labels[i]` = score > threshold (and every earlier step good where the label statistics say "
               "monotone labels: True). "
               "`debate` records what the debate did to each step (final, kept, corrected, revised).",
}

TARGETS = {"gold": "the agent's final answer equals the gold answer",
           "consensus": "the agent's final answer equals the team's final answer (no gold used)"}
TASKS = {"rsft": "text-generation", "augmented": "text-generation", "process": "token-classification"}


def _listing(ids: list[str], limit: int = 20) -> str:
    shown = ", ".join(f"`{i}`" for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def render_card(kind: str, *, run: str, sources: list[dict[str, Any]], config: dict[str, Any],
                stats: dict[str, Any], extra_configs: dict[str, str] | None = None) -> str:
    """The card's markdown with a YAML header for the Hub.

    The header names no ``configs``: ``load_dataset(folder)`` then finds ``data/train-*.parquet`` by itself.
    With ``configs`` in a local card, datasets 5.2 caches by the config alone, so two run folders with the
    same kind name would load each other's stale rows. ``extra_configs`` maps other formats to their folder
    (``load_dataset(folder, data_dir=...)``).
    """
    header = {"pretty_name": f"pluribus {kind} ({run})", "tags": ["pluribus", "multi-agent-debate", "distillation", kind],
              "task_categories": [TASKS[kind]]}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# pluribus `{kind}` dataset from run `{run}`", "", HOW[kind], "",
             f"Correct means: {TARGETS[config.get('target', 'gold')]} (`build.target`).", "", "## Source", ""]
    lines += ["| store | config hash | trajectories | corrupt lines skipped |", "|---|---|---|---|"]
    for s in sources:
        lines.append(f"| `{s['path']}` | `{s['config_hash']}` | {s['records']} | {s['skipped']} |")
    lines += ["", "## Counts", "", "| what | count |", "|---|---|"]
    for key, value in stats["counts"].items():
        lines.append(f"| {key} | {value} |")
    if "labels" in stats:
        lines += ["", "## Labels", "", "| statistic | value |", "|---|---|"]
        for key, value in stats["labels"].items():
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    for key, title in (("no_steps", "Traces where the step rule found no step"),
                       ("too_many_steps", "Traces skipped for having more than max_steps steps"),
                       ("no_target", "Problems without a target answer"),
                       ("skipped_lines", "Corrupt store lines skipped (build.skip_corrupt)"),
                       ("duplicate_lines", "Store lines repeating a problem (the first line was used)")):
        if stats.get(key):
            lines += ["", f"## {title} ({len(stats[key])})", "", _listing(stats[key])]
    if extra_configs:
        lines += ["", "## Other formats", ""]
        lines += [f"- `{name}`: `load_dataset(<this folder>, data_dir=\"{folder}\")`"
                  for name, folder in extra_configs.items()]
    lines += ["", "## Build config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
