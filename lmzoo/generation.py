"""Family-agnostic decoding (placeholder: the search lands next)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class Decoding:
    """What a model gives the search.

    start(params, inputs, max_len) -> (static, cache): runs the encoder/prompt once; ``inputs`` is a dict
        of [B, ...] arrays (input_ids, attention_mask, ...); every leaf of static and cache has batch first.
    step(params, static, cache, tokens [N], index) -> (logits [N, V] float32, cache): feeds one token per
        row at position ``index`` (a traced int32 scalar).
    """

    start: Callable
    step: Callable
    vocab_size: int
    is_encoder_decoder: bool = True
