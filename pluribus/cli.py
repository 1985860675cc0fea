"""The `pluribus` command line: one typer app, a thin sub-command per stage (parse -> config -> stage -> summary)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pluribus.errors import PluribusError

app = typer.Typer(
    help="Distill a debating team of LLM agents into one model; merge expert adapters into one checkpoint.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="List and resolve models (hub ids, local folders, .gguf files, aliases).",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console(stderr=True)

RecipeArg = Annotated[Path | None, typer.Argument(help="Recipe YAML (configs/quickstart.yaml).")]
OverridesArg = Annotated[list[str] | None, typer.Argument(help="Dotted overrides, e.g. team.rounds=3 train.lr=1e-4")]


# ------------------------------------------------------------------------------------------- recipe


@app.command("config")
def config_cmd(recipe: RecipeArg = None, overrides: OverridesArg = None) -> None:
    """Validate RECIPE with OVERRIDES and print it as it would run."""
    from pluribus.config import load_recipe

    print(load_recipe(recipe, overrides or []).to_yaml(), end="")


# ------------------------------------------------------------------------------------------- models


@models_app.command("list")
def models_list() -> None:
    """Show the aliases pluribus knows and whether each is available offline."""
    from rich.table import Table

    from pluribus.models import list_models

    table = Table("alias", "source", "status")
    for row in list_models():
        table.add_row(row["alias"], row["source"], row["status"])
    Console().print(table)


@models_app.command("resolve")
def models_resolve(model: Annotated[str, typer.Argument(help="Hub id, local folder, .gguf file or alias.")]) -> None:
    """Print the local folder that `from_pretrained` loads for MODEL (dequantizing a GGUF once if needed)."""
    from pluribus.models import resolve_model

    print(resolve_model(model))


# -------------------------------------------------------------------------------------- entry point


def main() -> None:
    """Run the CLI; user errors print one line and exit with code 2."""
    try:
        app(standalone_mode=False)
    except PluribusError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except FileExistsError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; what was finished is stored and a rerun resumes from there")
        sys.exit(130)
    except Exception as e:
        # click's own usage errors (typer may vendor click, so match by shape rather than by class)
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Exit":
            sys.exit(getattr(e, "exit_code", 0))
        if type(e).__name__ == "Abort":
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
