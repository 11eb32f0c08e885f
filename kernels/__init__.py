"""Pallas kernels, each with a plain-jnp reference function of the same signature.

block_sparse_attention: flash-style block-sparse attention (block_sparse_attention,
block_sparse_attention_reference, BlockLayout and its builders).
"""
