from engram_lm.compat.reference import ReferenceEngram, config_from_reference, from_reference

__all__ = ["ReferenceEngram", "config_from_reference", "from_reference"]
