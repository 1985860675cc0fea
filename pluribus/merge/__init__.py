"""Merging experts: tensor math, rank-heterogeneous adapter merges, streaming full-model merges, LoRA extraction."""
