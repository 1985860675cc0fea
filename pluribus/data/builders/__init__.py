"""Dataset builders: trajectory stores -> rsft, augmented and process datasets (parquet + dataset card).

The build stage that runs them for a recipe (and pushes the datasets to the Hub) is pluribus.stages.build.
"""

from pluribus.data.builders.datasets import KINDS, Built, build, open_sources, read_trajectories

__all__ = ["KINDS", "Built", "build", "open_sources", "read_trajectories"]
