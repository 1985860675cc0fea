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

    def generation(self, g: int) -> RunLayout:
        """The folders of generation ``g`` (pluribus.generations): generation 1 is the run itself, so a run without
        generations and the first generation of one are laid out alike; generation g >= 2 is ``gen<g>/``, with
        the same inner layout (trajectories, self, datasets, adapters, merged)."""
        if g < 1:
            raise ValueError(f"generations count from 1, not {g}")
        return self if g == 1 else RunLayout(self.root / f"gen{g}")

    @property
    def generations_record(self) -> Path:
        """What each generation's stop check measured and decided (generations.stop_if_no_gain)."""
        return self.root / "generations.json"

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
