"""GLM generation: the KV-cache decoder, the search with transformers 4.33 rules, and blank infilling.

* :func:`glm_decoding` gives the shared :class:`lmzoo.generation.Decoding` contract for a decoder-only model:
  ``start`` runs the prompt except its last token into a K/V cache, ``step`` feeds one token per row at cache
  slot ``index`` with the 2-D position of that column (from the precomputed ``position_ids``) and the row of
  the generation mask (or causal when none is given).
* :func:`generate` is what ``model.generate`` runs: the HF GLM call (``input_ids`` = context + [sop],
  ``position_ids`` [B, 2, L+G], ``generation_attention_mask`` [B, 1, L+G, L+G]) with transformers 4.33.3
  semantics, which the released HF GLM code was used with: n-gram blocking and the beam length penalty count
  the prompt (``score = sum_logprobs / len(prompt + generated)**length_penalty``). Greedy and sampling run as
  one compiled ``lax.while_loop``; beam search runs one compiled step per token with the (tiny) hypothesis
  bookkeeping on the host, exactly as transformers orders it.
* :func:`blank_layout` / :func:`fill_blanks` build GLM's infilling layout (Part A = the text with its blanks,
  Part B = ``[sop] span`` at the blank's position with block positions 1, 2, ...) and fill several blanks in
  order, each new span seeing the context and every span generated before it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .generation import Decoding

__all__ = ["glm_decoding", "generate", "GLMGenerationSettings", "blank_layout", "fill_blanks", "BlankLayout"]

NEG_INF = -float("inf")


# ----------------------------------------------------------------------------------------------------
# the decoder
def glm_decoding(model) -> Decoding:
    """start(params, inputs, max_len): inputs ``input_ids`` [B,L], ``position_ids`` [B,2,>=max_len] and optionally
    ``generation_attention_mask`` [B,1,>=max_len,>=max_len]; the first L-1 tokens fill the cache, the last one is
    fed by the first ``step`` at index L-1."""
    from .glm import GLMModule

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
        if L > 1:
            cache = module.apply({"params": params}, ids[:, :-1], pos[:, :, : L - 1], pre_mask, max_len, method=GLMModule.prefill)
        else:
            z = jnp.zeros((B, max_len, c.num_attention_heads, c.head_dim), c.compute_dtype)
            cache = [(z, z) for _ in range(c.num_layers)]
        static = {"position_ids": pos}
        if gmask is not None:
            static["mask"] = gmask
        return static, cache

    def step(params, static, cache, tokens, index):
        N = tokens.shape[0]
        T = cache[0][0].shape[1]
        pos = jax.lax.dynamic_index_in_dim(static["position_ids"], index, axis=2, keepdims=False)  # [N, 2]
        visible = jnp.arange(T)[None, :] <= index
        if "mask" in static:
            visible = visible & jax.lax.dynamic_index_in_dim(static["mask"], index, axis=1, keepdims=False)
        visible = jnp.broadcast_to(visible, (N, T))
        return module.apply({"params": params}, tokens, pos, visible, cache, index, method=GLMModule.decode_step)

    return Decoding(start=start, step=step, vocab_size=c.vocab_size, is_encoder_decoder=False, length_bucket=None)


# ----------------------------------------------------------------------------------------------------
# settings
_ACCEPTED = (
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "num_beams", "do_sample", "top_k", "top_p",
    "temperature", "length_penalty", "no_repeat_ngram_size", "early_stopping", "repetition_penalty",
    "num_return_sequences", "use_cache", "decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id",
    "forced_bos_token_id", "forced_eos_token_id", "bad_words_ids", "seed",
)


@dataclasses.dataclass(frozen=True)
class GLMGenerationSettings:
    max_length: int
    min_length: int
    num_beams: int
    do_sample: bool
    top_k: int
    top_p: float
    temperature: float
    length_penalty: float
    no_repeat_ngram_size: int
    early_stopping: Any
    repetition_penalty: float
    num_return_sequences: int
    eos: tuple[int, ...]
    pad: int
    forced_eos: Optional[int]
    bad_words_ids: tuple[tuple[int, ...], ...]
    seed: int

    def compile_key(self):
        # numbers that only enter as traced values do not split the compile cache
        return dataclasses.replace(self, max_length=0, min_length=0, seed=0, top_p=float(self.top_p < 1.0),
                                   temperature=float(self.temperature != 1.0), repetition_penalty=float(self.repetition_penalty != 1.0))


def _ids(x) -> tuple[int, ...]:
    if x is None:
        return ()
    if isinstance(x, (list, tuple, np.ndarray)):
        return tuple(int(i) for i in np.asarray(x).reshape(-1))
    return (int(x),)


def resolve(defaults: dict, kwargs: dict, prompt_len: int, vocab: int) -> GLMGenerationSettings:
    unknown = [k for k in kwargs if k not in _ACCEPTED]
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {unknown}; accepted: {list(_ACCEPTED)}")
    s = dict(defaults)
    s.update(kwargs)

    def num(name, default, cast):
        v = s.get(name)
        return default if v is None else cast(v)

    max_length = num("max_length", 20, int)
    if s.get("max_new_tokens") is not None:
        max_length = prompt_len + int(s["max_new_tokens"])
    min_length = num("min_length", 0, int)
    if s.get("min_new_tokens") is not None:
        min_length = max(min_length, prompt_len + int(s["min_new_tokens"]))
    eos = _ids(s.get("eos_token_id"))
    pad = s.get("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0
    bad = s.get("bad_words_ids") or ()
    if bad and not all(isinstance(b, (list, tuple)) and len(b) > 0 for b in bad):
        raise ValueError(f"bad_words_ids must be a list of non-empty lists of token ids, got {bad!r}")
    early = s.get("early_stopping", False)
    if early not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early!r}")
    if s.get("forced_bos_token_id") is not None:
        raise ValueError("forced_bos_token_id has no meaning for GLM (decoder-only: the prompt is already there)")
    fe = s.get("forced_eos_token_id")
    out = GLMGenerationSettings(
        max_length=max_length,
        min_length=min_length,
        num_beams=num("num_beams", 1, int),
        do_sample=bool(s.get("do_sample") or False),
        top_k=num("top_k", 0, int),
        top_p=num("top_p", 1.0, float),
        temperature=num("temperature", 1.0, float),
        length_penalty=num("length_penalty", 1.0, float),
        no_repeat_ngram_size=num("no_repeat_ngram_size", 0, int),
        early_stopping=early,
        repetition_penalty=num("repetition_penalty", 1.0, float),
        num_return_sequences=num("num_return_sequences", 1, int),
        eos=eos,
        pad=int(pad),
        forced_eos=None if fe is None else _ids(fe)[0],
        bad_words_ids=tuple(tuple(int(t) for t in b) for b in bad),
        seed=num("seed", 0, int),
    )
    if out.num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {out.num_beams}")
    if out.num_beams > 1 and out.do_sample:
        raise NotImplementedError("beam sampling (num_beams > 1 with do_sample=True) is not implemented for GLM")
    if out.num_return_sequences < 1 or (not out.do_sample and out.num_return_sequences > out.num_beams):
        raise ValueError(f"num_return_sequences={out.num_return_sequences} must be between 1 and num_beams={out.num_beams}")
    if out.max_length <= prompt_len:
        raise ValueError(f"max_length={out.max_length} leaves no room to generate after a prompt of {prompt_len} tokens")
    if out.do_sample and out.temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {out.temperature}")
    if not 0.0 <= out.top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {out.top_p}")
    for name, ids in (("eos_token_id", eos), ("bad_words_ids", tuple(t for b in out.bad_words_ids for t in b))):
        for i in ids:
            if not 0 <= i < vocab:
                raise ValueError(f"{name} contains {i}, outside the vocabulary [0, {vocab})")
    return out


# ----------------------------------------------------------------------------------------------------
# logits processors, transformers 4.33 order: repetition penalty, no-repeat n-gram, bad words, min length,
# forced EOS; then (sampling) temperature, top-k, top-p.
def process(scores, tokens, cur, s: GLMGenerationSettings, dyn, *, keep: int = 1):
    """scores [N,V] (f32) given tokens [N,S] whose first ``cur`` columns are the sequence so far."""
    N, V = scores.shape
    S = tokens.shape[1]
    pos = jnp.arange(S)
    rows = lambda a: jnp.broadcast_to(jnp.arange(N)[:, None], a.shape)
    if s.repetition_penalty != 1.0:
        p = dyn["repetition_penalty"]
        idx = jnp.where(pos[None, :] < cur, tokens, V)
        got = jnp.take_along_axis(scores, jnp.minimum(idx, V - 1), axis=1)
        scores = scores.at[rows(idx), idx].set(jnp.where(got < 0, got * p, got / p), mode="drop")
    n = s.no_repeat_ngram_size
    if n > 0:
        # n-grams ending at j+n-1 < cur whose first n-1 tokens equal the last n-1 generated ones
        match = pos[None, :] + n <= cur
        for o in range(n - 1):
            prev = jax.lax.dynamic_slice_in_dim(tokens, cur - n + 1 + o, 1, axis=1)
            match = match & (jnp.roll(tokens, -o, axis=1) == prev)
        banned = jnp.where(match, jnp.roll(tokens, -(n - 1), axis=1), V)
        ban = jnp.zeros((N, V), bool).at[rows(banned), banned].set(True, mode="drop")
        scores = jnp.where(ban & (cur + 1 >= n), NEG_INF, scores)
    for seq in s.bad_words_ids:
        *prefix, last = seq
        hit = jnp.ones((N,), bool)
        if prefix:
            k = len(prefix)
            tail = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(cur - k, 0), k, axis=1)
            hit = jnp.all(tail == jnp.asarray(prefix, tokens.dtype)[None], axis=1) & (cur >= k)
        scores = scores.at[:, last].set(jnp.where(hit, NEG_INF, scores[:, last]))
    if s.eos:
        eos = jnp.asarray(s.eos)
        scores = scores.at[:, eos].set(jnp.where(cur < dyn["min_length"], NEG_INF, scores[:, eos]))
    if s.forced_eos is not None:
        forced = jnp.full((V,), NEG_INF).at[s.forced_eos].set(0.0)
        scores = jnp.where(cur == dyn["max_length"] - 1, forced[None], scores)
    if s.do_sample:
        if s.temperature != 1.0:
            scores = scores / dyn["temperature"]
        if s.top_k > 0:
            k = min(max(s.top_k, keep), V)
            kth = jax.lax.top_k(scores, k)[0][:, -1:]
            scores = jnp.where(scores < kth, NEG_INF, scores)
        if s.top_p < 1.0:
            order = jnp.argsort(scores, axis=-1)  # ascending, as transformers sorts
            sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
            cum = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
            remove = (cum <= 1.0 - dyn["top_p"]).at[:, V - keep:].set(False)
            remove = jnp.zeros_like(remove).at[rows(order), order].set(remove)
            scores = jnp.where(remove, NEG_INF, scores)
    return scores


def _dyn(s: GLMGenerationSettings):
    return {
        "max_length": jnp.int32(s.max_length),
        "min_length": jnp.int32(s.min_length),
        "temperature": jnp.float32(s.temperature),
        "top_p": jnp.float32(s.top_p),
        "repetition_penalty": jnp.float32(s.repetition_penalty),
    }


def _greedy_or_sample(dec: Decoding, s: GLMGenerationSettings, S: int):
    def run(params, inputs, dyn, key):
        ids = inputs["input_ids"]
        N, L = ids.shape
        static, cache = dec.start(params, inputs, S)
        tokens = jnp.full((N, S), s.pad, jnp.int32).at[:, :L].set(ids)
        eos = jnp.asarray(s.eos or (-1,), jnp.int32)

        def cond(c):
            return (c["cur"] < dyn["max_length"]) & jnp.any(c["alive"])

        def body(c):
            cur = c["cur"]
            logits, cache = dec.step(params, static, c["cache"], c["tokens"][:, cur - 1], cur - 1)
            scores = process(logits, c["tokens"], cur, s, dyn)
            if s.do_sample:
                nxt = jax.random.categorical(jax.random.fold_in(key, cur), scores, axis=-1)
            else:
                nxt = jnp.argmax(scores, axis=-1)
            nxt = jnp.where(c["alive"], nxt.astype(jnp.int32), s.pad)
            alive = c["alive"] & ~jnp.any(nxt[:, None] == eos[None], axis=1)
            return {"tokens": c["tokens"].at[:, cur].set(nxt), "cache": cache, "cur": cur + 1, "alive": alive}

        c = {"tokens": tokens, "cache": cache, "cur": jnp.int32(L), "alive": jnp.ones((N,), bool)}
        c = jax.lax.while_loop(cond, body, c)
        return c["tokens"], c["cur"]

    return run


def _beam_step(dec: Decoding, s: GLMGenerationSettings, K: int):
    """One compiled beam step: reorder the cache, feed the last tokens, score, top-K over beams x vocab."""

    def step(params, static, cache, src, tokens, cur, beam_scores, dyn):
        cache = jax.tree.map(lambda x: jnp.take(x, src, axis=0), cache)
        logits, cache = dec.step(params, static, cache, tokens[:, cur - 1], cur - 1)
        logp = jax.nn.log_softmax(logits, axis=-1)
        scores = process(logp, tokens, cur, s, dyn) + beam_scores[:, None]
        nb = s.num_beams
        N, V = scores.shape
        top, cand = jax.lax.top_k(scores.reshape(N // nb, nb * V), K)
        return cache, top, cand

    return step


class _Hypotheses:
    """transformers 4.33 ``BeamHypotheses``: the score divides by the FULL length (prompt included)."""

    def __init__(self, num_beams, length_penalty, early_stopping, max_length):
        self.nb, self.lp, self.early, self.max_length = num_beams, length_penalty, early_stopping, max_length
        self.beams: list[tuple[float, np.ndarray]] = []
        self.worst = 1e9

    def add(self, hyp: np.ndarray, sum_logprobs: float):
        score = sum_logprobs / (len(hyp) ** self.lp)
        if len(self.beams) < self.nb or score > self.worst:
            self.beams.append((score, hyp))
            if len(self.beams) > self.nb:
                ranked = sorted((sc, i) for i, (sc, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.beams) < self.nb:
            return False
        if self.early is True:
            return True
        if self.early is False:
            return self.worst >= best_sum_logprobs / cur_len**self.lp
        # "never": the best a running beam can still reach
        denom = self.max_length if self.lp > 0.0 else cur_len
        return self.worst >= best_sum_logprobs / denom**self.lp


def _beam_search(model, dec, s: GLMGenerationSettings, inputs, S: int):
    nb = s.num_beams
    ids = np.asarray(inputs["input_ids"])
    B, L = ids.shape
    K = max(2, 1 + len(s.eos)) * nb
    key = ("glm-beam-start", S)
    start = model._decode_cache.get(key)
    if start is None:
        start = model._decode_cache[key] = jax.jit(lambda p, i: dec.start(p, i, S))
    key = ("glm-beam-step", s.compile_key(), S)
    step = model._decode_cache.get(key)
    if step is None:
        step = model._decode_cache[key] = jax.jit(_beam_step(dec, s, K))
    rep = lambda x: jnp.repeat(x, nb, axis=0)
    static, cache = start(model.params, inputs)
    static, cache = jax.tree.map(rep, static), jax.tree.map(rep, cache)
    N = B * nb
    tokens = np.full((N, S), s.pad, np.int32)
    tokens[:, :L] = np.repeat(ids, nb, axis=0)
    beam_scores = np.zeros((B, nb), np.float32)
    beam_scores[:, 1:] = -1e9
    hyps = [_Hypotheses(nb, s.length_penalty, s.early_stopping, s.max_length) for _ in range(B)]
    done = np.zeros(B, bool)
    src = np.arange(N, dtype=np.int32)
    dyn = _dyn(s)
    eos = set(s.eos)
    V = dec.vocab_size
    cur = L
    while True:
        cache, top, cand = step(model.params, static, cache, jnp.asarray(src), jnp.asarray(tokens), jnp.int32(cur),
                                jnp.asarray(beam_scores.reshape(N)), dyn)
        top, cand = np.asarray(top), np.asarray(cand)
        new_scores = np.zeros((B, nb), np.float32)
        new_tok = np.full((B, nb), s.pad, np.int32)
        new_src = np.arange(N, dtype=np.int32).reshape(B, nb)
        for b in range(B):
            if done[b]:
                continue
            j = 0
            for rank in range(K):
                tok, beam = int(cand[b, rank] % V), int(cand[b, rank] // V)
                row = b * nb + beam
                if tok in eos:
                    if rank >= nb:
                        continue
                    hyps[b].add(tokens[row, :cur].copy(), float(top[b, rank]))
                else:
                    new_scores[b, j], new_tok[b, j], new_src[b, j] = top[b, rank], tok, row
                    j += 1
                if j == nb:
                    break
            done[b] = done[b] or hyps[b].is_done(float(top[b].max()), cur)
        src = new_src.reshape(N)
        tokens = tokens[src]
        tokens[:, cur] = new_tok.reshape(N)
        beam_scores = new_scores
        cur += 1
        if done.all() or cur >= s.max_length:
            break
    # finalize: running beams of unfinished items become hypotheses too
    for b in range(B):
        if done[b]:
            continue
        for j in range(nb):
            hyps[b].add(tokens[b * nb + j, :cur].copy(), float(beam_scores[b, j]))
    best = []
    for h in hyps:
        ranked = sorted(h.beams, key=lambda x: x[0])
        for _ in range(s.num_return_sequences):
            best.append(ranked.pop()[1])
    lengths = np.array([len(x) for x in best])
    width = min(int(lengths.max()) + 1, s.max_length)
    out = np.full((len(best), width), s.pad, np.int64)
    for i, hyp in enumerate(best):
        out[i, : len(hyp)] = hyp
        if len(hyp) < width and s.eos:
            out[i, len(hyp)] = s.eos[0]
    return out


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
    s = resolve(model.config.generation_defaults(), kwargs, L, V)
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
    if s.num_beams > 1:
        return _beam_search(model, dec, s, inputs, S)
    n = s.num_return_sequences if s.do_sample else 1
    if n > 1:
        inputs = {k: jnp.repeat(v, n, axis=0) for k, v in inputs.items()}
    key = ("glm-greedy", s.compile_key(), S, "mask" in str(sorted(inputs)))
    fn = model._decode_cache.get(key)
    if fn is None:
        fn = model._decode_cache[key] = jax.jit(_greedy_or_sample(dec, s, S))
    tokens, cur = fn(model.params, inputs, _dyn(s), jax.random.PRNGKey(s.seed))
    return np.asarray(tokens)[:, : int(cur)].astype(np.int64)


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
