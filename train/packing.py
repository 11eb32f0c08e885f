"""Packing: several encoder-decoder examples per row with segment ids, as T5X packs them (``data.pack``).

Two halves, so that batch ``s`` stays a pure function of (seed, s, host) and resume stays exact:

* **groups** (once per run, seeded): :func:`pack_groups` walks the examples in a seeded order and puts
  each into the first of the last few open rows whose encoder and decoder room still hold the example's
  *budget* — an upper bound of its built lengths that the objective gives (``Objective.pack_lengths``:
  exact for supervised pairs, the worst case of the noising for pretraining chunks). A group is one row;
  the loader then shuffles and batches groups exactly as it batches single examples, so the grouping is
  the same in every epoch (the per-step noise is not). No example is split across rows; an example never
  exceeds a row, because budgets are cut to ``seq_len`` / ``target_len`` as the unpacked layout cuts.
* **layout** (every step): :func:`packed_seq2seq_arrays` lays out the built (noised) examples of each
  group one after another:

  ``input_ids`` / ``labels``: the examples' inputs / targets back to back, then pad / -100;
  ``segment_ids`` / ``decoder_segment_ids``: 1, 2, ... per example, 0 on padding;
  ``position_ids`` / ``decoder_position_ids``: 0, 1, ... restarting at every example, 0 on padding;
  ``decoder_input_ids``: each example's targets shifted right behind the decoder start token (so every
  segment starts with it), pad on padding; ``attention_mask``: 1 on real input tokens.

The loss is the unpacked one: labels are -100 outside the examples' targets, so its count is the number
of real target tokens. Attention stays within a segment through the segment ids (see
``lmzoo.attention.attend``), which makes each example's logits those it would get alone in a row.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["pack_groups", "packed_seq2seq_arrays", "PACKED_KEYS"]

PACKED_KEYS = ("segment_ids", "decoder_segment_ids", "position_ids", "decoder_position_ids")


def pack_groups(
    examples: Sequence[Any],
    lengths: Callable[[Any], tuple[int, int]],
    seq_len: int,
    target_len: int,
    *,
    seed: int = 0,
    open_rows: int = 8,
) -> list[tuple]:
    """Group ``examples`` into rows: each a tuple of examples whose ``lengths(x) = (encoder, decoder)``
    budgets add up to at most ``seq_len`` / ``target_len``. First fit over the ``open_rows`` most recently
    opened rows, in a seeded order (a pure function of ``seed``)."""
    n = len(examples)
    budgets = [lengths(examples[i]) for i in range(n)]
    for i, (e, d) in enumerate(budgets):
        if not (0 < e <= seq_len and 0 <= d <= target_len):
            raise ValueError(f"example {i} needs {e} encoder / {d} decoder positions; a row has {seq_len} / {target_len}")
    order = np.random.default_rng((int(seed), 0x9AC4)).permutation(n)
    done: list[list[int]] = []
    rows: list[list] = []  # [encoder used, decoder used, member indices]
    for i in order:
        e, d = budgets[i]
        for r in rows:
            if r[0] + e <= seq_len and r[1] + d <= target_len:
                r[0] += e
                r[1] += d
                r[2].append(int(i))
                break
        else:
            rows.append([e, d, [int(i)]])
            if len(rows) > open_rows:
                done.append(rows.pop(0)[2])
    done += [r[2] for r in rows]
    return [tuple(examples[i] for i in members) for members in done]


def packed_seq2seq_arrays(
    rows: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]],
    seq_len: int,
    target_len: int,
    pad: int,
    start: int,
) -> dict[str, np.ndarray]:
    """The packed encoder-decoder batch of ``rows`` (each a list of (inputs, targets) token lists)."""
    B = len(rows)
    input_ids = np.full((B, seq_len), pad, np.int32)
    seg = np.zeros((B, seq_len), np.int32)
    pos = np.zeros((B, seq_len), np.int32)
    labels = np.full((B, target_len), -100, np.int32)
    dec = np.full((B, target_len), pad, np.int32)
    dseg = np.zeros((B, target_len), np.int32)
    dpos = np.zeros((B, target_len), np.int32)
    for r, examples in enumerate(rows):
        e = d = 0
        for k, (inputs, targets) in enumerate(examples, 1):
            ni, nt = len(inputs), len(targets)
            if e + ni > seq_len or d + nt > target_len:
                raise ValueError(f"row {r}: segment {k} does not fit ({e + ni} > {seq_len} or {d + nt} > {target_len})")
            input_ids[r, e : e + ni] = inputs
            seg[r, e : e + ni] = k
            pos[r, e : e + ni] = np.arange(ni)
            if nt:
                labels[r, d : d + nt] = targets
                dec[r, d] = start
                dec[r, d + 1 : d + nt] = targets[:-1]
                dseg[r, d : d + nt] = k
                dpos[r, d : d + nt] = np.arange(nt)
            e, d = e + ni, d + nt
    return {
        "input_ids": input_ids,
        "attention_mask": (seg > 0).astype(np.int32),
        "segment_ids": seg,
        "position_ids": pos,
        "decoder_input_ids": dec,
        "labels": labels,
        "decoder_segment_ids": dseg,
        "decoder_position_ids": dpos,
    }
