"""The export section: the Hub-ready folder of the distilled adapter or merged model, and its push."""

from __future__ import annotations

from pydantic import Field

from pluribus.config.base import Section


class ExportConfig(Section):
    """A Hub-ready folder of the distilled adapter (or merged model), and optionally its push."""

    source: str | None = Field(
        None, description="Adapter or model folder to export (default: <run>/merged/<the first merge> if a merge "
        "section exists, else <run>/adapters/<the first expert that is not a PRM>)."
    )
    repo_id: str | None = Field(None, description="Hub repository to push to (None: only write <run>/export).")
    private: bool = Field(True, description="Create the Hub repository private (only with repo_id); an existing "
                          "repository keeps its visibility.")
    token_env: str = Field("HF_TOKEN", description="Environment variable holding the Hub token (never printed).")
    datasets: list[str] = Field(default_factory=list, description="Hub dataset ids for the card's datasets field.")
    overwrite: bool = Field(True, description="Replace <run>/export if it exists.")

