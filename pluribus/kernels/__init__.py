"""Triton kernels for the LoRA / attention hot path, each with a PyTorch twin, and their dispatch."""
