"""Gather, on a machine with network, what ``make gpu-check`` installs offline on a GPU machine (``make gpu-wheels``).

A GPU machine without network may hold torch, transformers, peft, accelerate and triton (Python 3.12) and little
else of pluribus's dependencies. Into one folder (default ``gpu-wheels/``, git-ignored) this downloads the
wheels of the rest for CPython 3.12 manylinux x86_64 (``pip download --only-binary=:all:``), writes the
``requirements.txt`` the check installs them by (``pip install --no-index --find-links``: pip takes only what
the machine lacks), and copies the embedded model's tokenizer (``tokenizer/``) for the check's random model.

Left out: the five and what they require (present wherever they are: numpy, huggingface_hub, safetensors, pyyaml,
tokenizers, sympy, ...), and pyarrow + pandas (with tzdata, which only pandas needs): 64 MiB of wheels together
(pyarrow alone 52), over the folder's 64 MiB budget. ``datasets`` needs both; a machine without them fails the
check's install with pip naming them. The folder must stay under 64 MiB: the device tool carries at most that.

    python bench/gpu_wheels.py [--out gpu-wheels]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# keep bench/ off sys.path: a script there must never shadow an installed package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

REPO = Path(__file__).resolve().parents[1]
FIVE = ("torch", "transformers", "peft", "accelerate", "triton")
# required by every transformers 5.x: wherever transformers is installed, so are they
WITH_TRANSFORMERS = ("numpy", "huggingface-hub", "safetensors", "pyyaml", "tokenizers", "regex", "tqdm", "packaging")
# small direct dependencies of pluribus that some huggingface_hub versions require and others do not: always carried;
# and fsspec, which datasets caps at the newest it was tested with: a machine's newer fsspec is downgraded from here
ALWAYS = ("typer", "rich", "pydantic", "fsspec")
TOO_BIG = ("pyarrow", "pandas", "tzdata")
EXTRA = ("pytest>=8", "math-verify>=0.7")  # the kernel tests; the eval extra (symbolic answer checks)
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
BUDGET = 64 * 2**20


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> set[str]:
    """Every distribution ``roots`` require, transitively, as installed here (extras left out)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def requirements() -> list[str]:
    """pluribus's dependencies (pyproject.toml; the installed package's on Python 3.10) other than the five, plus
    EXTRA."""
    from packaging.requirements import Requirement

    try:
        import tomllib

        deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    except ImportError:  # Python 3.10: the metadata of `pip install -e .` (make setup) lists the same
        deps = [r for r in md.requires("pluribus") or [] if "extra ==" not in r]
    return [d for d in deps if norm(Requirement(d).name) not in FIVE] + list(EXTRA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "gpu-wheels")
    args = parser.parse_args()
    reqs = requirements()
    present = closure([*FIVE, *WITH_TRANSFORMERS]) - closure(list(ALWAYS))
    with tempfile.TemporaryDirectory(prefix="gpu-wheels.") as tmp:
        platforms = [a for p in PLATFORMS for a in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version",
                        "3.12", "--implementation", "cp", *platforms, "-d", tmp, *reqs], check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        keep = [w for w in wheels if norm(w.name.split("-")[0]) not in present | set(TOO_BIG)]
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        for w in keep:
            shutil.move(str(w), args.out / w.name)
    # the check installs by name: only what the GPU machine lacks comes from the folder
    (args.out / "requirements.txt").write_text("\n".join(r for r in reqs) + "\n")
    from pluribus.models import resolve_model

    embedded = resolve_model("smollm2-135m")
    (args.out / "tokenizer").mkdir()
    for f in embedded.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template"))
                            or f.name == "added_tokens.json"):
            shutil.copy2(f, args.out / "tokenizer" / f.name)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{len(keep)} wheels + requirements.txt + tokenizer/ in {args.out}: {size / 2**20:.1f} MiB "
          f"(left out: the five and what they require; {', '.join(TOO_BIG)}: over the budget)")
    if size >= BUDGET:
        raise SystemExit(f"{args.out} holds {size / 2**20:.1f} MiB, over the 64 MiB the device tool carries")


if __name__ == "__main__":
    main()
