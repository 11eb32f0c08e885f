"""Family-agnostic decoding: greedy, sampling and beam search as ONE compiled program each.

The search knows nothing of any model: a model hands it a :class:`Decoding` (run the encoder or prompt
once; feed one token per row with a KV cache). Semantics follow transformers 4.46 ``generate()`` so that
greedy and beam outputs are token-for-token those of the original: the same logits processors in the
same order (repetition penalty, no-repeat n-grams, bad words, min length, forced BOS/EOS, then
temperature / top-k / top-p when sampling), the same beam bookkeeping (2·num_beams candidates, EOS
accepted only within the top num_beams, hypotheses scored ``sum_logprobs / generated_len**length_penalty``,
early_stopping True / False / "never"), and the same output layout (start token first, finished rows
padded with pad_token_id, cut where every row has finished).

Decoding runs inside one ``lax.while_loop`` with the cache in the carry. It is compiled once per
(batch, input-length bucket, cache-length bucket, num_beams, sampling flags); numeric settings
(max/min length, penalties, special ids, temperature, top-p, top-k) are traced arguments, so changing
them does not recompile.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from lmzoo.convert.keymap import flatten_tree, unflatten_tree

from .layers import few_rows

__all__ = ["Decoding", "GenerationSettings", "generate", "search", "resolve_settings", "apply_processors", "dynamic_settings", "static_settings", "compile_count"]

NEG_INF = -float("inf")


@dataclasses.dataclass(frozen=True)
class Decoding:
    """What a model gives the search.

    start(params, inputs, max_len) -> (static, cache): runs the encoder (or the prompt) once; ``inputs``
        is a dict of [B, ...] arrays (input_ids, attention_mask, ...); every leaf of ``static`` and
        ``cache`` has the batch first. ``max_len`` is the (static) number of decoder positions to cache.
    step(params, static, cache, tokens [N], index) -> (logits [N, V] float32, cache): feeds one token per
        row at decoder position ``index`` (a traced int32 scalar).
    length_bucket: inputs are right-padded (mask 0) to a multiple of this many tokens so that nearby
        lengths share one compiled program; None keeps the exact length (models whose outputs depend on
        the padded length, e.g. block-sparse encoders with a short-input fallback).
    """

    start: Callable
    step: Callable
    vocab_size: int
    is_encoder_decoder: bool = True
    length_bucket: Optional[int] = 32
    pad_input_id: Optional[int] = None  # id used to pad inputs to the bucket (default: pad_token_id)
    cache_bucket: Optional[int] = 64  # decoder positions are cached for max_length rounded up to this
    beam_rules: str = "4.46"  # "4.33": beam length penalty counts the whole prompt (decoder-only models)
    max_positions: Optional[int] = None  # learned decoder positions: max_length may not exceed them
    # True: ``static`` stays [B, ...] (one copy per input row) while the cache and tokens have N = B·n rows,
    # each input row's n beams / returned sequences consecutive; the step groups them (e.g. as n queries
    # against one copy of the encoder's keys and values). False: every static leaf is repeated to N rows.
    shared_static: bool = False

    def prompt_offset(self, prompt_len: int) -> int:
        """P in the beam length penalty ``sum_logprobs / (length - P)**lp`` (length = tokens incl. prompt)."""
        if self.is_encoder_decoder or self.beam_rules == "4.33":
            return 1  # transformers counts the decoder start token out / 4.33 counts hyp.shape[-1]
        return prompt_len


# kwargs generate() accepts, with transformers' meaning
SETTING_NAMES = (
    "max_length",
    "max_new_tokens",
    "min_length",
    "min_new_tokens",
    "num_beams",
    "do_sample",
    "top_k",
    "top_p",
    "temperature",
    "length_penalty",
    "no_repeat_ngram_size",
    "early_stopping",
    "repetition_penalty",
    "num_return_sequences",
    "use_cache",
    "decoder_start_token_id",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "bad_words_ids",
    "seed",
)


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    max_length: int
    min_length: int
    num_beams: int
    do_sample: bool
    top_k: int
    top_p: float
    temperature: float
    length_penalty: float
    no_repeat_ngram_size: int
    early_stopping: Any  # True, False or "never"
    repetition_penalty: float
    num_return_sequences: int
    decoder_start_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    forced_bos_token_id: Optional[int]
    forced_eos_token_id: Optional[tuple[int, ...]]
    bad_words_ids: tuple[tuple[int, ...], ...]
    seed: int


def _as_id_list(x) -> tuple[int, ...]:
    if x is None:
        return ()
    if isinstance(x, (list, tuple, np.ndarray)):
        return tuple(int(i) for i in np.asarray(x).reshape(-1))
    return (int(x),)


def resolve_settings(defaults: dict, kwargs: dict, *, prompt_length: int, vocab_size: int) -> GenerationSettings:
    """Merge kwargs over the model's config defaults with transformers' rules (explicit None = off)."""
    unknown = [k for k in kwargs if k not in SETTING_NAMES]
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {unknown}; accepted: {list(SETTING_NAMES)}")
    s = dict(defaults)
    s.update(kwargs)

    def num(name, default, cast):
        v = s.get(name)
        return default if v is None else cast(v)

    max_length = num("max_length", 20, int)
    if s.get("max_new_tokens") is not None:
        max_length = int(s["max_new_tokens"]) + prompt_length
    min_length = num("min_length", 0, int)
    if s.get("min_new_tokens") is not None:
        min_length = max(min_length, int(s["min_new_tokens"]) + prompt_length)
    num_beams = num("num_beams", 1, int)
    nrs = num("num_return_sequences", 1, int)
    eos = _as_id_list(s.get("eos_token_id"))
    pad = s.get("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0
    start = s.get("decoder_start_token_id")
    if start is None:
        start = s.get("bos_token_id")
    if start is None:
        raise ValueError("generate() needs decoder_start_token_id (or bos_token_id); the config has neither")
    early = s.get("early_stopping", False)
    if early not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early!r}")
    forced_eos = s.get("forced_eos_token_id")
    bad = s.get("bad_words_ids") or ()
    if bad and not all(isinstance(b, (list, tuple)) and len(b) > 0 for b in bad):
        raise ValueError(f"bad_words_ids must be a list of non-empty lists of token ids, got {bad!r}")
    out = GenerationSettings(
        max_length=max_length,
        min_length=min_length,
        num_beams=num_beams,
        do_sample=bool(s.get("do_sample") or False),
        top_k=num("top_k", 0, int),
        top_p=num("top_p", 1.0, float),
        temperature=num("temperature", 1.0, float),
        length_penalty=num("length_penalty", 1.0, float),
        no_repeat_ngram_size=num("no_repeat_ngram_size", 0, int),
        early_stopping=early,
        repetition_penalty=num("repetition_penalty", 1.0, float),
        num_return_sequences=nrs,
        decoder_start_token_id=int(start),
        eos_token_ids=eos,
        pad_token_id=int(pad),
        forced_bos_token_id=None if s.get("forced_bos_token_id") is None else int(s["forced_bos_token_id"]),
        forced_eos_token_id=None if forced_eos is None else _as_id_list(forced_eos),
        bad_words_ids=tuple(tuple(int(t) for t in b) for b in bad),
        seed=num("seed", 0, int),
    )
    if out.num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {out.num_beams}")
    if out.num_return_sequences < 1 or (not out.do_sample and out.num_return_sequences > out.num_beams):
        raise ValueError(
            f"num_return_sequences={out.num_return_sequences} must be between 1 and num_beams={out.num_beams} "
            "for greedy/beam search"
        )
    if out.max_length <= prompt_length:
        raise ValueError(f"max_length={out.max_length} leaves no room to generate after a prompt of {prompt_length}")
    if out.temperature <= 0 and out.do_sample:
        raise ValueError(f"temperature must be > 0 when sampling, got {out.temperature}")
    if not 0.0 <= out.top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {out.top_p}")
    for name, ids in (("eos_token_id", eos), ("pad_token_id", (out.pad_token_id,)), ("decoder_start_token_id", (out.decoder_start_token_id,))):
        for i in ids:
            if not 0 <= i < vocab_size and name != "pad_token_id":
                raise ValueError(f"{name}={i} is outside the vocabulary [0, {vocab_size})")
    return out


# ------------------------------------------------------------------------------------------------
# logits processors (transformers order)
def apply_processors(scores, tokens, cur, s: GenerationSettings, dyn, *, n_keep: int = 1):
    """Apply the processors and (when sampling) warpers to scores [N, V] given tokens [N, S] with cur filled."""
    N, V = scores.shape
    S = tokens.shape[1]
    pos = jnp.arange(S)
    if s.repetition_penalty != 1.0:
        p = dyn["repetition_penalty"]
        idx = jnp.where(pos[None, :] < cur, tokens, V)  # out-of-range -> dropped
        got = jnp.take_along_axis(scores, jnp.minimum(idx, V - 1), axis=1)
        new = jnp.where(got < 0, got * p, got / p)
        rows = jnp.broadcast_to(jnp.arange(N)[:, None], idx.shape)
        scores = scores.at[rows, idx].set(new, mode="drop")
    n = s.no_repeat_ngram_size
    if n > 0:
        # ban tokens that would repeat an n-gram already in tokens[:, :cur]
        match = pos[None, :] <= cur - n
        for o in range(n - 1):
            prev = jax.lax.dynamic_slice_in_dim(tokens, cur - n + 1 + o, 1, axis=1)
            shifted = jnp.roll(tokens, -o, axis=1)
            match = match & (shifted == prev)
        banned_tok = jnp.roll(tokens, -(n - 1), axis=1)
        banned_tok = jnp.where(match, banned_tok, V)
        rows = jnp.broadcast_to(jnp.arange(N)[:, None], banned_tok.shape)
        ban = jnp.zeros((N, V), bool).at[rows, banned_tok].set(True, mode="drop")
        scores = jnp.where(ban & (cur + 1 >= n), NEG_INF, scores)
    for seq in s.bad_words_ids:
        *prefix, last = seq
        hit = jnp.ones((N,), bool)
        if prefix:
            k = len(prefix)
            tail = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(cur - k, 0), k, axis=1)
            hit = jnp.all(tail == jnp.asarray(prefix, tokens.dtype)[None], axis=1) & (cur >= k)
        scores = scores.at[:, last].set(jnp.where(hit, NEG_INF, scores[:, last]))
    if s.eos_token_ids:
        eos = dyn["eos"]
        ban_eos = cur < dyn["min_length"]
        scores = scores.at[:, eos].set(jnp.where(ban_eos, NEG_INF, scores[:, eos]))
    if s.forced_bos_token_id is not None:
        forced = jnp.full((V,), NEG_INF).at[dyn["forced_bos"]].set(0.0)
        scores = jnp.where(cur == 1, forced[None, :], scores)
    if s.forced_eos_token_id is not None:
        forced = jnp.full((V,), NEG_INF).at[dyn["forced_eos"]].set(0.0)
        scores = jnp.where(cur == dyn["max_length"] - 1, forced[None, :], scores)
    if s.do_sample:
        if s.temperature != 1.0:
            scores = scores / dyn["temperature"]
        if s.top_k > 0:
            k = min(max(s.top_k, n_keep), V)
            kth = jax.lax.top_k(scores, k)[0][:, -1:]
            scores = jnp.where(scores < kth, NEG_INF, scores)
        if s.top_p < 1.0:
            order = jnp.argsort(scores, axis=-1)  # ascending
            sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
            cum = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
            remove = cum <= 1.0 - dyn["top_p"]
            remove = remove.at[:, V - n_keep :].set(False)
            rows = jnp.broadcast_to(jnp.arange(N)[:, None], order.shape)
            remove_orig = jnp.zeros_like(remove).at[rows, order].set(remove)
            scores = jnp.where(remove_orig, NEG_INF, scores)
    return scores


def _expand(tree, n: int):
    """Repeat every leaf's batch rows n times (row b -> rows b*n .. b*n+n-1)."""
    if n == 1:
        return tree
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)


def _isin(x, ids):
    if ids is None or ids.shape[0] == 0:
        return jnp.zeros(x.shape, bool)
    return jnp.any(x[..., None] == ids.astype(x.dtype), axis=-1)


# ------------------------------------------------------------------------------------------------
def _initial_tokens(dec: Decoding, inputs, n: int, S: int, dyn):
    """The token buffer [B*n, S] and the first free column: the start token, or the prompt (decoder-only)."""
    ids = inputs["input_ids"]
    B, L = ids.shape
    if dec.is_encoder_decoder:
        return jnp.full((B * n, S), dyn["pad"], jnp.int32).at[:, 0].set(dyn["start"]), 1
    prompt = jnp.repeat(ids.astype(jnp.int32), n, axis=0)
    return jnp.full((B * n, S), dyn["pad"], jnp.int32).at[:, :L].set(prompt), L


def _greedy_or_sample(dec: Decoding, s: GenerationSettings, S: int):
    def run(params, copies, inputs, dyn, key):
        B = inputs["input_ids"].shape[0]
        static, cache = dec.start(params, inputs, S)
        params = with_kernel_copies(params, copies)
        n = s.num_return_sequences if s.do_sample else 1
        static, cache = (static if dec.shared_static else _expand(static, n)), _expand(cache, n)
        N = B * n
        tokens, first = _initial_tokens(dec, inputs, n, S, dyn)

        def cond(c):
            return (c["cur"] < dyn["max_length"]) & jnp.any(c["alive"])

        def body(c):
            logits, cache = dec.step(params, static, _unsqueeze_rows(c["cache"], N), c["tokens"][:, c["cur"] - 1], c["cur"] - 1)
            cache = _squeeze_rows(cache, N)
            scores = apply_processors(logits.astype(jnp.float32), c["tokens"], c["cur"], s, dyn, n_keep=1)
            if s.do_sample:
                nxt = jax.random.categorical(jax.random.fold_in(key, c["cur"]), scores, axis=-1)
            else:
                nxt = jnp.argmax(scores, axis=-1)
            nxt = jnp.where(c["alive"], nxt.astype(jnp.int32), dyn["pad"])
            tokens = c["tokens"].at[:, c["cur"]].set(nxt)
            alive = c["alive"] & ~_isin(nxt, dyn["eos"])
            return {"tokens": tokens, "cache": cache, "cur": c["cur"] + 1, "alive": alive}

        c = {"tokens": tokens, "cache": _squeeze_rows(cache, N), "cur": jnp.int32(first), "alive": jnp.ones((N,), bool)}
        c = jax.lax.while_loop(cond, body, c)
        return c["tokens"], c["cur"]

    return run


# With a single decoding row the loop carries the cache without its row axis, and the step sees it re-added.
# XLA's CPU fusion otherwise gives a step's attention, which reads the cache through a reshape that drops
# the size-1 row axis, its own in-place copy of the cache update, and copy insertion then copies every layer's
# cache several times per step: ~5 ms of a ~25 ms T5-base step with a 320-position cache. With more than one
# row (batches, beams, several samples) it does not happen and the cache is carried as it is.
def _squeeze_rows(cache, N: int):
    return jax.tree.map(lambda x: x[0], cache) if N == 1 else cache


def _unsqueeze_rows(cache, N: int):
    return jax.tree.map(lambda x: x[None], cache) if N == 1 else cache


def _beam_search(dec: Decoding, s: GenerationSettings, S: int):
    nb = s.num_beams
    n_eos = max(len(s.eos_token_ids), 1)
    K = max(2, 1 + n_eos) * nb
    n_keep = 1 + n_eos  # min_tokens_to_keep of the warpers when beams > 1

    def hyp_add(h, tok_row, length, score, valid):
        """transformers BeamHypotheses.add for one batch item (slots ordered by insertion seq)."""
        full = h["count"] >= nb
        accept = valid & (~full | (score > h["worst"]))
        # the worst stored hypothesis: min score, earliest insertion among ties
        key = jnp.where(h["seq"] >= 0, h["score"], jnp.inf)
        worst_slot = jnp.lexsort((h["seq"], key))[0]
        slot = jnp.where(full, worst_slot, h["count"])
        upd = lambda arr, val: jnp.where(accept, arr.at[slot].set(val), arr)
        new = {
            "tokens": upd(h["tokens"], tok_row),
            "len": upd(h["len"], length),
            "score": upd(h["score"], score),
            "seq": upd(h["seq"], h["next_seq"]),
            "count": jnp.where(accept & ~full, h["count"] + 1, h["count"]),
            "next_seq": jnp.where(accept, h["next_seq"] + 1, h["next_seq"]),
        }
        stored = jnp.where(new["seq"] >= 0, new["score"], jnp.inf)
        new["worst"] = jnp.where(
            accept, jnp.where(full, jnp.min(stored), jnp.minimum(score, h["worst"])), h["worst"]
        )
        return new

    def lp_div(x, length):
        return x / jnp.power(length.astype(jnp.float32), jnp.float32(s.length_penalty))

    def run(params, copies, inputs, dyn, key):
        B = inputs["input_ids"].shape[0]
        N = B * nb
        P = dec.prompt_offset(inputs["input_ids"].shape[1])
        static, cache = dec.start(params, inputs, S)
        params = with_kernel_copies(params, copies)
        static, cache = (static if dec.shared_static else _expand(static, nb)), _expand(cache, nb)
        V = dec.vocab_size
        tokens, first = _initial_tokens(dec, inputs, nb, S, dyn)
        beam_scores = jnp.tile(jnp.concatenate([jnp.zeros((1,)), jnp.full((nb - 1,), -1e9)]), (B,)).astype(jnp.float32)
        hyps = {
            "tokens": jnp.full((B, nb, S), dyn["pad"], jnp.int32),
            "len": jnp.zeros((B, nb), jnp.int32),
            "score": jnp.zeros((B, nb), jnp.float32),
            "seq": jnp.full((B, nb), -1, jnp.int32),
            "count": jnp.zeros((B,), jnp.int32),
            "next_seq": jnp.zeros((B,), jnp.int32),
            "worst": jnp.full((B,), 1e9, jnp.float32),
        }

        def cond(c):
            return (c["cur"] < dyn["max_length"]) & ~jnp.all(c["done"])

        def body(c):
            cur = c["cur"]
            logits, cache = dec.step(params, static, c["cache"], c["tokens"][:, cur - 1], cur - 1)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            scores = apply_processors(logp, c["tokens"], cur, s, dyn, n_keep=n_keep)
            total = (scores + c["beam_scores"][:, None]).reshape(B, nb * V)
            if s.do_sample:
                g = jax.random.gumbel(jax.random.fold_in(key, cur), total.shape)
                _, cand = jax.lax.top_k(jnp.where(jnp.isfinite(total), total + g, NEG_INF), K)
                cand_scores = jnp.take_along_axis(total, cand, axis=1)
                order = jnp.argsort(-cand_scores, axis=1, stable=True)
                cand = jnp.take_along_axis(cand, order, axis=1)
                top = jnp.take_along_axis(cand_scores, order, axis=1)
            else:
                top, cand = jax.lax.top_k(total, K)
            src = cand // V
            tok = (cand % V).astype(jnp.int32)
            is_eos = _isin(tok, dyn["eos"])
            tokens3 = c["tokens"].reshape(B, nb, S)

            # finished hypotheses: EOS candidates ranked within the first num_beams
            def add_rank(r, h):
                rows = jnp.take_along_axis(tokens3, src[:, r][:, None, None], axis=1)[:, 0]
                valid = is_eos[:, r] & ~c["done"]
                sc = lp_div(top[:, r], jnp.broadcast_to(cur + 1 - P, (B,)))
                return jax.vmap(hyp_add)(h, rows, jnp.broadcast_to(cur, (B,)), sc, valid)

            hyps = jax.lax.fori_loop(0, nb, add_rank, c["hyps"])
            # running beams: the first num_beams non-EOS candidates in rank order
            rank = jnp.cumsum(~is_eos, axis=1) - 1
            take = ~is_eos & (rank < nb)
            slot = jnp.where(take, rank, nb)
            bidx = jnp.broadcast_to(jnp.arange(B)[:, None], slot.shape)
            new_scores = jnp.zeros((B, nb + 1), jnp.float32).at[bidx, slot].set(top)[:, :nb]
            new_tok = jnp.zeros((B, nb + 1), jnp.int32).at[bidx, slot].set(tok)[:, :nb]
            new_src = jnp.zeros((B, nb + 1), jnp.int32).at[bidx, slot].set(src.astype(jnp.int32))[:, :nb]
            done_before = c["done"][:, None]
            own = jnp.broadcast_to(jnp.arange(nb)[None, :], (B, nb))
            new_scores = jnp.where(done_before, 0.0, new_scores)
            new_tok = jnp.where(done_before, dyn["pad"], new_tok)
            new_src = jnp.where(done_before, own, new_src)
            # is_done with the best of all candidates (EOS ones included)
            best = top[:, 0]
            if s.early_stopping is True:
                finished = jnp.ones((B,), bool)
            elif s.early_stopping is False:
                finished = hyps["worst"] >= lp_div(best, cur + 1 - P)
            else:
                denom = jnp.where(s.length_penalty > 0.0, dyn["max_length"] - P, cur + 1 - P)
                finished = hyps["worst"] >= lp_div(best, denom)
            done = c["done"] | ((hyps["count"] >= nb) & finished)
            gsrc = (jnp.arange(B)[:, None] * nb + new_src).reshape(N)
            cache = jax.tree.map(lambda x: jnp.take(x, gsrc, axis=0), cache)
            tokens = jnp.take(c["tokens"], gsrc, axis=0).at[:, cur].set(new_tok.reshape(N))
            return {
                "tokens": tokens,
                "cache": cache,
                "cur": cur + 1,
                "beam_scores": new_scores.reshape(N),
                "hyps": hyps,
                "done": done,
            }

        c = {
            "tokens": tokens,
            "cache": cache,
            "cur": jnp.int32(first),
            "beam_scores": beam_scores,
            "hyps": hyps,
            "done": jnp.zeros((B,), bool),
        }
        c = jax.lax.while_loop(cond, body, c)
        cur = c["cur"]
        tokens3 = c["tokens"].reshape(B, nb, S)
        bs = c["beam_scores"].reshape(B, nb)

        def final_add(j, h):
            sc = lp_div(bs[:, j], jnp.broadcast_to(cur - P, (B,)))
            return jax.vmap(hyp_add)(h, tokens3[:, j], jnp.broadcast_to(cur, (B,)), sc, ~c["done"])

        hyps = jax.lax.fori_loop(0, nb, final_add, c["hyps"])
        # best first: highest score, latest insertion among ties (transformers pops the last of a stable sort)
        key_score = jnp.where(hyps["seq"] >= 0, hyps["score"], -jnp.inf)
        order = jax.vmap(lambda sc, sq: jnp.lexsort((-sq, -sc)))(key_score, hyps["seq"])[:, : s.num_return_sequences]
        best_tokens = jnp.take_along_axis(hyps["tokens"], order[:, :, None], axis=1)
        best_len = jnp.take_along_axis(hyps["len"], order, axis=1)
        width = jnp.minimum(jnp.max(best_len) + 1, dyn["max_length"])
        pos = jnp.arange(S)[None, None, :]
        eos0 = dyn["eos"][0] if s.eos_token_ids else 0
        out = jnp.where(pos < best_len[:, :, None], best_tokens, dyn["pad"])
        if s.eos_token_ids:
            out = jnp.where((pos == best_len[:, :, None]) & (best_len[:, :, None] < width), eos0, out)
        return out.reshape(B * s.num_return_sequences, S), width

    return run


def out_major_copies(model, dec: Decoding, inputs: dict, S: int) -> dict:
    """Out-major copies ([out, in]) of the 2-D ``kernel`` params that ``dec.step`` reads, keyed by param path.

    A decoding step multiplies a few rows (batch x beams) by every decoder matrix; on CPU that runs ~2x
    faster against out-major weights (see :func:`lmzoo.layers.few_rows_dot`). The copies are made once and
    kept on the model (remade when any of their kernels is no longer the model's), since remaking them in
    every call costs more than a short search saves (page faults on ~0.4 GB for T5-base). They cost the
    memory of those matrices, and none are made when that exceeds ``model.out_major_decode_max_bytes``
    (2 GiB by default); ``model.out_major_decode_weights = False`` goes without them, and
    ``model.drop_decode_copies()`` frees them (and forgets that decision).
    """
    params = model.params
    held = getattr(model, "_out_major", None)
    if held is not None:
        flat = flatten_tree(params)
        if all(flat.get(path) is src for path, src in held[0].items()):
            return held[1]
    # Which kernels the step reads: trace it once on abstract inputs and keep the params its equations use.
    static, cache = jax.eval_shape(lambda p, i: dec.start(p, i, S), params, inputs)
    B = inputs["input_ids"].shape[0]
    closed = jax.make_jaxpr(dec.step)(params, static, cache, jax.ShapeDtypeStruct((B,), jnp.int32),
                                      jax.ShapeDtypeStruct((), jnp.int32))
    used = {v for e in closed.jaxpr.eqns for v in e.invars if isinstance(v, jax.extend.core.Var)}
    flat = [(tuple(k.key for k in path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
    kernels = {path: leaf for (path, leaf), var in zip(flat, closed.jaxpr.invars)
               if var in used and path[-1] == "kernel" and leaf.ndim == 2}
    if sum(k.nbytes for k in kernels.values()) > getattr(model, "out_major_decode_max_bytes", float("inf")):
        copies = {}  # too big to hold twice: the step multiplies by the kernels as stored
    else:
        copies = jax.jit(lambda ks: {path: k.T for path, k in ks.items()})(kernels)
    model._out_major = (kernels, copies)
    return copies


def with_kernel_copies(params, copies: dict):
    """params with each out-major copy put beside its kernel as ``kernel_t`` (what :class:`Linear` reads)."""
    if not copies:
        return params
    return unflatten_tree({**flatten_tree(params), **{path[:-1] + ("kernel_t",): kt for path, kt in copies.items()}})


def _bucket(n: int, b: Optional[int]) -> int:
    return n if not b else int(math.ceil(n / b) * b)


def compile_count(model) -> int:
    """How many decoding programs this model has compiled so far (one per shape bucket and beam width)."""
    return sum(fn._cache_size() for fn in model._decode_cache.values())


def dynamic_settings(s: GenerationSettings) -> dict:
    """The traced numbers of a search (changing them does not recompile)."""
    return {
        "max_length": jnp.int32(s.max_length),
        "min_length": jnp.int32(s.min_length),
        "pad": jnp.int32(s.pad_token_id),
        "start": jnp.int32(s.decoder_start_token_id),
        "forced_bos": jnp.int32(s.forced_bos_token_id or 0),
        "temperature": jnp.float32(s.temperature),
        "top_p": jnp.float32(s.top_p),
        "repetition_penalty": jnp.float32(s.repetition_penalty),
        "eos": jnp.asarray(s.eos_token_ids or (0,), jnp.int32)[: len(s.eos_token_ids)],
        "forced_eos": jnp.asarray(s.forced_eos_token_id or (0,), jnp.int32),
    }


def static_settings(s: GenerationSettings) -> GenerationSettings:
    """The settings with every traced number blanked: what one compiled search depends on."""
    beam = s.num_beams > 1
    return dataclasses.replace(
        s,
        max_length=0, min_length=0, length_penalty=s.length_penalty if beam else 0.0,
        temperature=float(s.temperature != 1.0), top_p=float(s.top_p < 1.0),
        repetition_penalty=float(s.repetition_penalty != 1.0), decoder_start_token_id=0, pad_token_id=0,
        forced_bos_token_id=None if s.forced_bos_token_id is None else 0,
        eos_token_ids=(0,) * len(s.eos_token_ids),
        forced_eos_token_id=None if s.forced_eos_token_id is None else (0,) * len(s.forced_eos_token_id),
        seed=0,
    )


def search(model, dec: Decoding, s: GenerationSettings, inputs: dict, S: int) -> np.ndarray:
    """Run the compiled greedy/sampling/beam program over ``inputs`` (batch-first arrays) with a cache of S."""
    if dec.max_positions is not None and s.max_length > dec.max_positions:
        raise ValueError(
            f"max_length={s.max_length} exceeds the model's {dec.max_positions} learned decoder positions "
            "(max_position_embeddings)"
        )
    beam = s.num_beams > 1
    extra = tuple(sorted(k for k in inputs if k not in ("input_ids", "attention_mask")))
    key = ("beam" if beam else "greedy", static_settings(s), S, extra)
    fn = model._decode_cache.get(key)
    if fn is None:
        builder = _beam_search if beam else _greedy_or_sample
        fn = jax.jit(builder(dec, s, S))
        model._decode_cache[key] = fn
    B = inputs["input_ids"].shape[0]
    N = B * (s.num_beams if beam else s.num_return_sequences if s.do_sample else 1)
    copies = {}
    if getattr(model, "out_major_decode_weights", False) and few_rows(N):
        copies = out_major_copies(model, dec, inputs, S)
    tokens, width = fn(model.params, copies, inputs, dynamic_settings(s), jax.random.PRNGKey(s.seed))
    return np.asarray(tokens)[:, : int(width)]


def generate(model, input_ids, attention_mask=None, **kwargs) -> np.ndarray:
    """transformers-compatible ``generate`` for encoder-decoder models (see module docstring)."""
    dec: Decoding = model.decoding()
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length > 0, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= dec.vocab_size:
        raise ValueError(f"input_ids contain ids outside the vocabulary [0, {dec.vocab_size}): min {ids.min()}, max {ids.max()}")
    s = resolve_settings(model.config.generation_defaults(), kwargs, prompt_length=1, vocab_size=dec.vocab_size)
    if attention_mask is None:
        # transformers infers the mask from padding when pad is in the input and differs from eos
        infer = (ids == s.pad_token_id).any() and s.pad_token_id not in s.eos_token_ids
        mask = (ids != s.pad_token_id).astype(np.int32) if infer else np.ones_like(ids, np.int32)
    else:
        mask = np.asarray(attention_mask).astype(np.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}")
    B, L = ids.shape
    Lb = _bucket(L, dec.length_bucket)
    if Lb != L:
        fill = s.pad_token_id if dec.pad_input_id is None else dec.pad_input_id
        ids = np.concatenate([ids, np.full((B, Lb - L), fill, ids.dtype)], axis=1)
        mask = np.concatenate([mask, np.zeros((B, Lb - L), mask.dtype)], axis=1)
    S = _bucket(s.max_length, dec.cache_bucket)
    inputs = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask, jnp.int32)}
    return search(model, dec, s, inputs, S)
