from engram_lm.engram.conv import ShortConv
from engram_lm.engram.gate import ContextGate, gate_values, squash
from engram_lm.engram.module import Engram

__all__ = ["ContextGate", "Engram", "ShortConv", "gate_values", "squash"]
