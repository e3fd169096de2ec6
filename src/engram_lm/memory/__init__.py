from engram_lm.memory.dense import DenseTable

__all__ = ["DenseTable"]
