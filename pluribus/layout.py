"""The run folder: every path a stage reads or writes inside ``runs/<name>/`` (DESIGN.md, "The run folder")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder. ``self`` data (the single agent's own samples) lives under ``self/``."""

    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def stages(self) -> Path:
        return self.root / "stages.json"

    def trajectories(self, data: str = "team") -> Path:
        return self._data_root(data) / "trajectories"

    def rollouts(self, data: str = "team") -> Path:
        return self._data_root(data) / "rollouts"

    def datasets(self, data: str = "team") -> Path:
        return self._data_root(data) / "datasets"

    def dataset(self, kind: str, data: str = "team") -> Path:
        return self.datasets(data) / kind

    def adapter(self, name: str) -> Path:
        return self.root / "adapters" / name

    def merged(self, name: str) -> Path:
        return self.root / "merged" / name

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def _data_root(self, data: str) -> Path:
        if data not in ("team", "self"):
            raise ValueError(f"data is 'team' or 'self', not {data!r}")
        return self.root if data == "team" else self.root / "self"
