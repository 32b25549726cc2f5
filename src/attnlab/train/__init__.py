"""Training from scratch: run configs and presets, token data, the trainer (single process or DDP)."""
