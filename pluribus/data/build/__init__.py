"""Dataset builders: trajectory stores -> rsft, augmented and process datasets (parquet + dataset card)."""

from pluribus.data.build.stage import (
    KINDS,
    Built,
    build,
    build_recipe,
    open_sources,
    push_to_hub,
    read_trajectories,
)

__all__ = ["KINDS", "Built", "build", "build_recipe", "open_sources", "push_to_hub", "read_trajectories"]
