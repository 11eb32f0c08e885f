"""The search's contract with a model's Decoding, on a toy model (no weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmzoo.generation import Decoding, generate

V = 8


class _Config:
    def generation_defaults(self):
        return {}


class _Toy:
    """Row b of the input favours token ``input_ids[b, 0]`` in every step; records the static batch the
    step sees (at trace time) and the rows it decodes."""

    def __init__(self, shared_static: bool):
        self.shared_static = shared_static
        self.config = _Config()
        self.params = {}
        self._decode_cache = {}
        self.seen = []

    def decoding(self):
        def start(params, inputs, max_len):
            ids = inputs["input_ids"]
            return {"favoured": ids[:, 0]}, {"steps": jnp.zeros((ids.shape[0],), jnp.int32)}

        def step(params, static, cache, tokens, index):
            rows, batch = tokens.shape[0], static["favoured"].shape[0]
            self.seen.append((batch, rows))
            fav = jnp.repeat(static["favoured"], rows // batch)  # row r belongs to input row r // (rows / batch)
            logits = jax.nn.one_hot(fav, V) * 10.0 + jnp.linspace(0.0, 0.1, V)[None, :]
            return logits.astype(jnp.float32), {"steps": cache["steps"] + 1}

        return Decoding(start=start, step=step, vocab_size=V, is_encoder_decoder=True, length_bucket=None,
                        shared_static=self.shared_static)


@pytest.mark.parametrize("kwargs", [
    dict(num_beams=3, num_return_sequences=2),
    dict(do_sample=True, top_k=1, num_return_sequences=2),
    dict(num_beams=1),
])
def test_shared_static_keeps_one_copy_per_input_row(kwargs):
    ids = np.array([[5, 2, 2], [3, 2, 2], [6, 2, 2]])
    common = dict(max_length=6, decoder_start_token_id=1, eos_token_id=0, pad_token_id=1, **kwargs)
    shared, expanded = _Toy(True), _Toy(False)
    a = generate(shared, ids, **common)
    b = generate(expanded, ids, **common)
    np.testing.assert_array_equal(a, b)
    n = kwargs.get("num_return_sequences", 1)
    # the best sequence of input b repeats input b's favoured token (beam search's runners-up differ)
    np.testing.assert_array_equal(a[::n, 1:], np.broadcast_to(ids[:, :1], (3, 5)))
    rows = 3 * max(kwargs.get("num_beams", 1), n if kwargs.get("do_sample") else 1)
    assert shared.seen and all(s == (3, rows) for s in shared.seen)
    assert expanded.seen and all(s == (rows, rows) for s in expanded.seen)


def test_a_single_decoding_row_still_gets_a_batch_first_cache():
    """With one row the loop carries the cache without its row axis (see generation._squeeze_rows); the step
    must still see and return [1, ...] leaves, and the tokens must not change."""
    seen_shapes = []

    class _Counting(_Toy):
        def decoding(self):
            dec = super().decoding()

            def step(params, static, cache, tokens, index):
                seen_shapes.append((cache["steps"].shape, tokens.shape))
                logits, cache = dec.step(params, static, cache, tokens, index)
                return logits, cache

            return Decoding(start=dec.start, step=step, vocab_size=V, is_encoder_decoder=True, length_bucket=None,
                            shared_static=True)

    ids = np.array([[5, 2, 2]])
    out = generate(_Counting(True), ids, max_length=6, decoder_start_token_id=1, eos_token_id=0, pad_token_id=1)
    np.testing.assert_array_equal(out, [[1, 5, 5, 5, 5, 5]])
    assert seen_shapes and all(s == ((1,), (1,)) for s in seen_shapes)
