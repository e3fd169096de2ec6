"""Checkpoint reading and writing: a layer below training, memory tiers and inference."""
