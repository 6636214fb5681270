"""Engine: generation loops, KV caches, scheduling and sampling over a sharded model."""
