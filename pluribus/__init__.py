"""pluribus: distill a debating team of LLM agents into one model, and merge expert adapters into one checkpoint."""

__version__ = "0.2.0"
