"""The recipe: one typed, frozen pydantic schema for a whole run, loaded from YAML with dotted overrides.

Every section is optional; a stage that needs a missing section says which one. Unknown keys are errors.
``load_recipe`` turns every validation problem into one ``RecipeError`` whose message names the field path,
the bad value and what is allowed; the CLI prints it on one line and exits with code 2.

One module per section (task, agents, team, build, train, merge, eval, export, generations), the whole recipe and
its cross-section names (recipe), reading and writing it (loading), and its field reference (explain); every
public name is importable from here.
"""

from pluribus.config.agents import (
    DEVICE_KEYS,
    VLLM_OWN_ARGS,
    AgentConfig,
    SamplingConfig,
    VLLMSettings,
    without_engine_settings,
)
from pluribus.config.base import Section
from pluribus.config.build import BuildConfig
from pluribus.config.eval import SYSTEMS, EvalConfig, EvalTask
from pluribus.config.export import ExportConfig
from pluribus.config.generations import GenerationsConfig
from pluribus.config.loading import load_recipe, validate_recipe, write_recipe
from pluribus.config.merge import MergeConfig
from pluribus.config.recipe import Recipe, seat_base_model, seat_problem, seatable
from pluribus.config.task import SyntheticConfig, TaskConfig
from pluribus.config.team import TeamConfig
from pluribus.config.train import (
    DATASET_OF_OBJECTIVE,
    OBJECTIVES,
    REPORT_TO,
    LoraSettings,
    PRMSettings,
    RLSettings,
    TrainConfig,
)

__all__ = [
    "DATASET_OF_OBJECTIVE", "DEVICE_KEYS", "OBJECTIVES", "REPORT_TO", "SYSTEMS", "VLLM_OWN_ARGS", "AgentConfig",
    "BuildConfig", "EvalConfig", "EvalTask", "ExportConfig", "GenerationsConfig", "LoraSettings", "MergeConfig",
    "PRMSettings", "RLSettings", "Recipe", "SamplingConfig", "Section", "SyntheticConfig", "TaskConfig", "TeamConfig",
    "TrainConfig", "VLLMSettings", "load_recipe", "seat_base_model", "seat_problem", "seatable", "validate_recipe",
    "without_engine_settings", "write_recipe",
]
