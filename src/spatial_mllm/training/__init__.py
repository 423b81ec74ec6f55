"""Training: the run config, the two-stage LLaVA recipe on accelerate, checkpoints and resume, LoRA and merge,
and the frozen-ViT feature cache."""
