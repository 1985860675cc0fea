"""The pipeline's stages behind one protocol: a recipe in, a ``StageSummary`` out, and what each reads for freshness.

Each module here is one stage (debate, selfsamples, build, train, merge, eval, export). It has ``run(recipe, ...)``,
which the CLI's command of that stage calls, and ``plan(recipe)``, the ``Stage`` steps `pluribus run` schedules:
each step's ``run`` calls the same function, so both print the same summary. A step names the settings and the
files its output depends on (``settings``, ``inputs``: what run.py fingerprints for freshness) and whether it keeps an
answer store (``keeps_store``: it always runs and generates only what the store lacks). The components they drive
(the debate engine, the builders, the trainers, the merge methods, the scorer) know nothing of recipes' run folders
beyond what a stage passes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StageSummary:
    """What a stage did, as its CLI command prints it and as `pluribus run` prints it after the step."""

    stage: str  # debate | self | build | train:<expert> | merge:<name> | eval | export
    output: Path | None  # what it wrote (a folder, or a file such as eval's results.json)
    line: str  # the one-line form, in run's table of steps
    columns: tuple[str, ...] = ()  # a table, when the stage has one
    rows: tuple[tuple[str, ...], ...] = ()
    warnings: tuple[str, ...] = ()  # printed (stderr) before the table: skipped lines, a stage's caveats
    notes: tuple[str, ...] = ()  # printed after the table: paths written, what else to read

    def print(self, out: Any, err: Any, *, notes: bool = True) -> None:
        """Show it on rich consoles: warnings on ``err``, the table and the notes on ``out``."""
        from rich.markup import escape
        from rich.table import Table

        for w in self.warnings:
            err.print(w, markup=False, highlight=False, soft_wrap=True)
        if self.columns:
            table = Table(*self.columns)
            for row in self.rows:
                table.add_row(*(escape(v) for v in row))
            print_table(out, table)
        for n in self.notes if notes else ():
            out.print(n, markup=False, highlight=False, soft_wrap=True)  # soft_wrap: a path cut over lines cannot be copied


def print_table(console: Any, table: Any) -> None:
    """Print a rich table whole. In a terminal it fits the terminal; written to a log or a pipe, rich would squeeze
    it into 80 columns and cut names and figures ("single…", "(0.000…"), so there it gets the width it needs."""
    from rich.measure import Measurement

    if console.is_terminal:
        console.print(table)
        return
    need = Measurement.get(console, console.options.update_width(1 << 16), table).maximum
    width = console.width
    console.width = max(width, need)
    try:
        console.print(table)
    finally:
        console.width = width


def json_of(section: Any) -> Any:
    """A recipe section as the settings a fingerprint hashes; engine settings (vllm) size and schedule an engine
    and change no output, so they are left out (config.without_engine_settings)."""
    from pluribus.config import without_engine_settings

    return without_engine_settings(section.model_dump(mode="json")) if section is not None else None


@dataclass(frozen=True)
class Stage:
    """One step of `pluribus run`: a stage, or one expert / one merge of a stage."""

    key: str  # debate | self | build | train:<expert> | merge:<name> | eval | export
    run: Callable[[bool, bool], StageSummary]  # (progress, new_run) -> summary
    settings: Callable[[], Any] = lambda: None  # JSON of every setting that changes the output
    inputs: Callable[[], dict[str, Path]] = dict  # files it reads, by role
    keeps_store: bool = False  # resumes on its own: always runs, generates only what is missing
    after: tuple[str, ...] = ()  # keys of steps that make what it reads (run.plan orders it after them)
    skip: Callable[[], str | None] = lambda: None  # why it does not run now (a stopped generation), else None
