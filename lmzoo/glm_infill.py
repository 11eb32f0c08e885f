"""GLM generation: the KV-cache decoder, the search with transformers 4.33 rules, and blank infilling.

* :func:`glm_decoding` gives the shared :class:`lmzoo.generation.Decoding` contract for a decoder-only model:
  ``start`` runs the prompt except its last token into a K/V cache, ``step`` feeds one token per row at cache
  slot ``index`` with the 2-D position of that column (from the precomputed ``position_ids``) and the row of
  the generation mask (or causal when none is given).
* :func:`generate` is what ``model.generate`` runs: the HF GLM call (``input_ids`` = context + [sop],
  ``position_ids`` [B, 2, L+G], ``generation_attention_mask`` [B, 1, L+G, L+G]) with transformers 4.33.3
  semantics, which the released HF GLM code was used with: n-gram blocking and the beam length penalty count
  the prompt (``score = sum_logprobs / len(prompt + generated)**length_penalty``). The shared search of
  :mod:`lmzoo.generation` runs it: greedy, sampling and beam search each as one compiled ``lax.while_loop``.
* :func:`blank_layout` / :func:`fill_blanks` build GLM's infilling layout (Part A = the text with its blanks,
  Part B = ``[sop] span`` at the blank's position with block positions 1, 2, ...) and fill several blanks in
  order, each new span seeing the context and every span generated before it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .generation import Decoding, GenerationSettings, resolve_settings, search
from .layers import empty_decode_cache

__all__ = ["glm_decoding", "generate", "blank_layout", "fill_blanks", "BlankLayout", "multiple_choice_layout"]



# ----------------------------------------------------------------------------------------------------
# the decoder
def glm_decoding(model) -> Decoding:
    """start(params, inputs, max_len): inputs ``input_ids`` [B,L], ``position_ids`` [B,2,>=max_len] and optionally
    ``generation_attention_mask`` [B,1,>=max_len,>=max_len]; the first L-1 tokens fill the cache, the last one is
    fed by the first ``step`` at index L-1."""
    from .glm import GLMModule, factor_mask

    module, c = model.module, model.config

    def start(params, inputs, max_len):
        ids = inputs["input_ids"]
        B, L = ids.shape
        pos = inputs["position_ids"][:, :, :max_len]
        gmask = inputs.get("generation_attention_mask")
        if gmask is not None:
            gmask = gmask[:, 0, :max_len, :max_len] != 0  # [B, T, T]
            pre_mask = gmask[:, None, : L - 1, : L - 1]
        else:
            i = jnp.arange(L - 1)
            pre_mask = (i[None, :] <= i[:, None])[None, None]
        if c.attention_impl == "pallas":
            # the kernel takes the prompt's mask in factored form: causal, or the generation mask's top-left
            # block through factor_mask (the XLA path on device where that block does not factor)
            if gmask is None:
                pre_mask = {"prefix_len": jnp.zeros((B,), jnp.int32)}
            else:
                dense = pre_mask
                pre_mask = factor_mask(dense)
                pre_mask["prefix_len"] = jnp.broadcast_to(pre_mask["prefix_len"], (B,))
                pre_mask["key_mask"] = jnp.broadcast_to(pre_mask["key_mask"], (B, L - 1))
                pre_mask["dense"] = dense
        if L > 1:
            cache = module.apply({"params": params}, ids[:, :-1], pos[:, :, : L - 1], pre_mask, max_len, method=GLMModule.prefill)
        else:
            cache = empty_decode_cache(c.num_layers, B, c.num_attention_heads, c.head_dim, max_len, c.compute_dtype)
        static = {"position_ids": pos}
        if gmask is not None:
            static["mask"] = gmask
        return static, cache

    def step(params, static, cache, tokens, index):
        N = tokens.shape[0]
        T = cache[0][1].shape[2]  # v [N, n, T, d]
        pos = jax.lax.dynamic_index_in_dim(static["position_ids"], index, axis=2, keepdims=False)  # [N, 2]
        visible = jnp.arange(T)[None, :] <= index
        if "mask" in static:
            visible = visible & jax.lax.dynamic_index_in_dim(static["mask"], index, axis=1, keepdims=False)
        visible = jnp.broadcast_to(visible, (N, T))
        return module.apply({"params": params}, tokens, pos, visible, cache, index, method=GLMModule.decode_step)

    # positions and the generation mask are given per column up to max_length: cache exactly that many;
    # beams follow transformers 4.33 (the length penalty counts the prompt), as the released GLM code ran
    return Decoding(
        start=start, step=step, vocab_size=c.vocab_size, is_encoder_decoder=False, length_bucket=None,
        cache_bucket=None, beam_rules="4.33",
    )


# ----------------------------------------------------------------------------------------------------
# settings and processors: the shared ones (transformers' processors are the same in 4.33 and 4.46)
def resolve(model, kwargs: dict, prompt_len: int, vocab: int) -> GenerationSettings:
    defaults = dict(model.config.generation_defaults())
    if defaults.get("decoder_start_token_id") is None and defaults.get("bos_token_id") is None:
        defaults["decoder_start_token_id"] = 0  # decoder-only: the prompt is the start; the id is never used
    s = resolve_settings(defaults, kwargs, prompt_length=prompt_len, vocab_size=vocab)
    if s.forced_bos_token_id is not None:
        raise ValueError("forced_bos_token_id has no meaning for GLM (decoder-only: the prompt is already there)")
    for seq in s.bad_words_ids:
        for i in seq:
            if not 0 <= i < vocab:
                raise ValueError(f"bad_words_ids contains {i}, outside the vocabulary [0, {vocab})")
    return s


def generate(
    model,
    input_ids,
    attention_mask=None,
    position_ids=None,
    generation_attention_mask=None,
    **kwargs,
) -> np.ndarray:
    """HF GLM ``generate``: returns [B*num_return_sequences, T] ids = the prompt followed by the new tokens.

    ``attention_mask`` (the tokenizer's 2-D padding mask) is accepted and not read, as in the original, whose
    ``prepare_inputs_for_generation`` uses ``generation_attention_mask`` ([B, 1, T, T] or [B, T, T]) and
    ``position_ids`` ([B, 2, T]) sliced to the current length; without them positions are 0.. and attention
    is causal.
    """
    dec = glm_decoding(model)
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer ids [batch, length > 0], got shape {ids.shape} dtype {ids.dtype}")
    V = dec.vocab_size
    if ids.min() < 0 or ids.max() >= V:
        raise ValueError(f"input_ids contain ids outside the vocabulary [0, {V}): min {ids.min()}, max {ids.max()}")
    B, L = ids.shape
    s = resolve(model, kwargs, L, V)
    S = s.max_length  # tokens buffer; the last column fed to the model is S-2
    if position_ids is None:
        pos = np.stack([np.arange(S), np.zeros(S, np.int64)])[None].repeat(B, 0)
    else:
        pos = np.asarray(position_ids)
        if pos.ndim != 3 or pos.shape[:2] != (B, 2):
            raise ValueError(f"position_ids must be [batch={B}, 2, T], got shape {pos.shape}")
        if pos.shape[2] < S - 1:
            raise ValueError(
                f"position_ids cover {pos.shape[2]} columns but generating up to length {S} needs {S - 1} "
                "(build them for the context plus max_new_tokens)"
            )
        if pos.shape[2] < S:
            pos = np.concatenate([pos, pos[:, :, -1:]], axis=2)
        if pos.max() > model.config.max_sequence_length or pos.min() < 0:
            raise ValueError(f"position_ids must lie in [0, {model.config.max_sequence_length}], got {pos.min()}..{pos.max()}")
    inputs = {"input_ids": jnp.asarray(ids, jnp.int32), "position_ids": jnp.asarray(pos[:, :, :S], jnp.int32)}
    if generation_attention_mask is not None:
        gm = np.asarray(generation_attention_mask)
        if gm.ndim == 3:
            gm = gm[:, None]
        if gm.ndim != 4 or gm.shape[0] != B or gm.shape[2] < S - 1 or gm.shape[3] < S - 1:
            raise ValueError(
                f"generation_attention_mask must be [batch={B}, 1, T, T] with T >= {S - 1}, got shape {np.asarray(generation_attention_mask).shape}"
            )
        if gm.shape[2] < S:
            gm = np.pad(gm, [(0, 0), (0, 0), (0, S - gm.shape[2]), (0, S - gm.shape[3])])
        inputs["generation_attention_mask"] = jnp.asarray(gm[:, :, :S, :S] != 0)
    return search(model, dec, s, inputs, S).astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# blank infilling
@dataclasses.dataclass
class BlankLayout:
    """Arrays for one generate call: ``input_ids`` = columns so far + [sop], positions for L + G columns."""

    input_ids: np.ndarray  # [B, L]
    position_ids: np.ndarray  # [B, 2, L + G]
    generation_attention_mask: np.ndarray  # [B, 1, L + G, L + G]
    context_length: int  # padded Part-A length (the same for every row)


def blank_layout(
    contexts: Sequence[Sequence[int]],
    spans: Optional[Sequence[Sequence[tuple[int, Sequence[int]]]]] = None,
    *,
    next_mask: Sequence[int],
    max_gen_length: int,
    sop_id: int,
    pad_id: int,
) -> BlankLayout:
    """GLM's generation layout for a batch (the HF ``build_inputs_for_generation`` one, extended to several blanks).

    ``contexts``: Part A per row ([CLS] text-with-blanks eos), right-padded here to a common length with
    ``pad_id`` (pad slots consume positions but no query sees them). ``spans``: per row the spans generated so
    far as (mask position, tokens without the final eop); each is laid out as [sop] + tokens at that position
    with block positions 1, 2, ... and stays visible to later spans. ``next_mask``: per row the position of the
    blank to fill now; its [sop] goes last, followed by ``max_gen_length - 1`` slots to generate into.
    """
    B = len(contexts)
    spans = spans if spans is not None else [[] for _ in range(B)]
    Lc = max(len(c) for c in contexts)
    rows = []
    for b in range(B):
        ctx = list(contexts[b])
        tok = ctx + [pad_id] * (Lc - len(ctx))
        pos = list(range(Lc))
        blk = [0] * Lc
        real = [True] * len(ctx) + [False] * (Lc - len(ctx))
        for mpos, span in spans[b]:
            seq = [sop_id] + list(span)
            tok += seq
            pos += [mpos] * len(seq)
            blk += list(range(1, len(seq) + 1))
            real += [True] * len(seq)
        rows.append((tok, pos, blk, real))
    Lb = max(len(r[0]) for r in rows)  # Part B so far (+ pads for rows with shorter spans)
    G = max_gen_length
    T = Lb + G
    input_ids = np.full((B, Lb + 1), pad_id, np.int64)
    position_ids = np.zeros((B, 2, T), np.int64)
    mask = np.zeros((B, 1, T, T), np.int64)
    for b, (tok, pos, blk, real) in enumerate(rows):
        n = len(tok)
        tok, pos, blk, real = tok + [pad_id] * (Lb - n), pos + [0] * (Lb - n), blk + [0] * (Lb - n), real + [False] * (Lb - n)
        input_ids[b, :Lb] = tok
        input_ids[b, Lb] = sop_id
        m = int(next_mask[b])
        position_ids[b, 0] = pos + [m] * G
        position_ids[b, 1] = blk + list(range(1, G + 1))
        key_ok = np.array(real + [True] * G)
        i = np.arange(T)
        causal = i[None, :] <= i[:, None]
        in_ctx = i < Lc
        vis = key_ok[None, :] & (in_ctx[None, :] | causal)
        vis[:Lc] &= in_ctx[None, :]  # Part A rows see only Part A
        mask[b, 0] = vis
    return BlankLayout(input_ids, position_ids, mask, Lc)


def fill_blanks(
    model,
    tokenizer,
    texts: Sequence[str] | str,
    *,
    max_gen_length: int = 64,
    stop_ids: Optional[Sequence[int]] = None,
    return_ids: bool = False,
    **generate_kwargs,
):
    """Fill every [MASK] / [sMASK] / [gMASK] of each text in order of position; returns the filled texts.

    A text without a blank gets one appended (``tokenizer.default_mask``), as the original ``generate_samples``
    does. Each blank is generated by one :func:`generate` call (greedy, beam or sampling per
    ``generate_kwargs``) that stops at ``<|endofpiece|>`` (``stop_ids`` to override); spans generated before
    stay visible. Bans come from the config (``bad_words_id``) or an explicit ``bad_words_ids``.
    """
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    contexts = [tokenizer.encode_for_blanks(t) for t in texts]
    mask_ids = set(tokenizer.mask_token_ids)
    blanks = [[i for i, t in enumerate(c) if t in mask_ids] for c in contexts]
    stop = list(stop_ids) if stop_ids is not None else [tokenizer.eop_token_id]
    B = len(texts)
    spans: list[list[tuple[int, list[int]]]] = [[] for _ in range(B)]
    rounds = max(len(b) for b in blanks)
    kwargs = dict(generate_kwargs)
    kwargs.setdefault("eos_token_id", stop)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    for r in range(rounds):
        active = [b for b in range(B) if r < len(blanks[b])]
        lay = blank_layout(
            [contexts[b] for b in active],
            [spans[b] for b in active],
            next_mask=[blanks[b][r] for b in active],
            max_gen_length=max_gen_length,
            sop_id=tokenizer.sop_token_id,
            pad_id=tokenizer.pad_token_id,
        )
        out = generate(
            model,
            lay.input_ids,
            position_ids=lay.position_ids,
            generation_attention_mask=lay.generation_attention_mask,
            max_new_tokens=max_gen_length,
            **kwargs,
        )
        L = lay.input_ids.shape[1]
        for row, b in enumerate(active):
            new = []
            for t in out[row, L:].tolist():
                if t in stop:
                    break
                new.append(int(t))
            spans[b].append((blanks[b][r], new))
    if return_ids:
        return spans[0] if single else spans
    filled = []
    for b in range(B):
        ctx = contexts[b]
        by_pos = dict(spans[b])
        pieces, cur = [], []
        for i, t in enumerate(ctx):
            if i in by_pos:
                pieces.append(tokenizer.decode(cur))
                pieces.append(tokenizer.decode(by_pos[i]))
                cur = []
            else:
                cur.append(t)
        pieces.append(tokenizer.decode(cur))
        filled.append("".join(p for p in pieces))
    return filled[0] if single else filled


def multiple_choice_layout(
    contexts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[Sequence[int]]],
    *,
    mask_ids: Sequence[int],
    sop_id: int,
    pad_id: int = 0,
) -> dict:
    """Cloze-scoring inputs for :class:`lmzoo.glm.GLMForMultipleChoice` (HF ``build_inputs_for_multiple_choice``).

    Per row: the context (Part A, positions 0..), then for each choice c ``[sop] + c[:-1]`` at the position of
    the context's first blank with block positions 1..|c|. Each choice is causal within itself, sees the whole
    context and never another choice (block-diagonal mask). ``choice_indices`` are the positions whose
    distributions score the choice's tokens. Rows are right-padded with ``pad_id`` (masked out; position ids
    repeat the last column).
    """
    rows = []
    for ctx, chs in zip(contexts, choices):
        ctx = list(ctx)
        blank = next((i for i, t in enumerate(ctx) if t in set(mask_ids)), None)
        if blank is None:
            raise ValueError(f"context {ctx[:20]}... has no blank (one of ids {list(mask_ids)})")
        tok, pos, blk = list(ctx), list(range(len(ctx))), [0] * len(ctx)
        groups, ids_, idx_ = [(0, len(ctx))], [], []
        for c in chs:
            c = [int(t) for t in c]
            if not c:
                raise ValueError("a choice has no tokens")
            start = len(tok)
            ids_.append(c)
            idx_.append(list(range(start, start + len(c))))
            tok += [sop_id] + c[:-1]
            pos += [blank] * len(c)
            blk += list(range(1, len(c) + 1))
            groups.append((start, len(c)))
        rows.append((tok, pos, blk, groups, ids_, idx_))
    T = max(len(r[0]) for r in rows)
    B = len(rows)
    input_ids = np.full((B, T), pad_id, np.int64)
    position_ids = np.zeros((B, 2, T), np.int64)
    mask = np.zeros((B, 1, T, T), np.int64)
    for b, (tok, pos, blk, groups, _, _) in enumerate(rows):
        n = len(tok)
        input_ids[b, :n] = tok
        position_ids[b, 0, :n], position_ids[b, 1, :n] = pos, blk
        position_ids[b, :, n:] = position_ids[b, :, n - 1 : n]
        Lc = groups[0][1]
        mask[b, 0, :n, :Lc] = 1  # everything sees the context
        for start, length in groups[1:]:
            mask[b, 0, start : start + length, start : start + length] = np.tril(np.ones((length, length), np.int64))
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": mask,
        "choice_ids": [r[4] for r in rows],
        "choice_indices": [r[5] for r in rows],
    }
