"""Hostile: defines no masker; expect import."""
# EVOLVE-BLOCK-START
MASKER = None
# EVOLVE-BLOCK-END
