"""Attention kernels for the trusted side: sparse decode attention over a KV cache.

``sparse_decode`` dispatches to a Triton kernel on CUDA when Triton imports and to a pure
PyTorch path otherwise; ``sparse_decode_reference`` is the float64 ground truth. Triton is
imported lazily, so this package imports on CPU-only machines without it.
"""
from evaluator.kernels.sparse_decode import (
    group_union,
    sparse_decode,
    sparse_decode_reference,
    sparse_decode_torch,
    triton_available,
)

__all__ = ["group_union", "sparse_decode", "sparse_decode_reference", "sparse_decode_torch", "triton_available"]
