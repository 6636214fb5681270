"""Model definitions (Flax NNX), configs, weights and checkpoints."""
