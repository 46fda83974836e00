"""Hostile: imports nothing but fails at import; expect import."""
# EVOLVE-BLOCK-START
raise RuntimeError("configuration missing at import time")
# EVOLVE-BLOCK-END
