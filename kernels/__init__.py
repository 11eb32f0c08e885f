"""Pallas kernels, each with a plain-jnp reference function of the same signature."""

from lmzoo.kernels.block_sparse_attention import (
    BlockLayout,
    block_sparse_attention,
    block_sparse_attention_reference,
    causal_layout,
    dense_layout,
    local_layout,
    lsg_layout,
    prefix_layout,
    relative_positions,
)

__all__ = [
    "BlockLayout",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "causal_layout",
    "dense_layout",
    "local_layout",
    "lsg_layout",
    "prefix_layout",
    "relative_positions",
]
