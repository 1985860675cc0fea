"""LoRA/QLoRA trainers: reasoning SFT, trajectory-augmented SFT, process reward model, process-aware RL.

One module per objective (sft, prm, rl) composes the shared pieces: data (rows in), student (model, LoRA,
kernels), loop (the Trainer around them) and output (checkpoints, resume, the adapter and its record). The train
stage that runs one expert of a recipe is pluribus.stages.train.
"""
