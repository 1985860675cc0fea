"""LoRA/QLoRA trainers: reasoning SFT, trajectory-augmented SFT, process reward model, process-aware RL."""
