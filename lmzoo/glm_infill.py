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
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .generation import Decoding, GenerationSettings, _process, resolve_settings

__all__ = ["glm_decoding", "generate", "blank_layout", "fill_blanks", "BlankLayout", "multiple_choice_layout"]



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
# settings and processors: the shared ones (transformers' processors are the same in 4.33 and 4.46)
def resolve(model, kwargs: dict, prompt_len: int, vocab: int) -> GenerationSettings:
    defaults = dict(model.config.generation_defaults())
    if defaults.get("decoder_start_token_id") is None and defaults.get("bos_token_id") is None:
        defaults["decoder_start_token_id"] = 0  # decoder-only: the prompt is the start; the id is never used
    s = resolve_settings(defaults, kwargs, prompt_length=prompt_len, vocab_size=vocab)
    if s.num_beams > 1 and s.do_sample:
        raise NotImplementedError("beam sampling (num_beams > 1 with do_sample=True) is not implemented for GLM")
    if s.forced_bos_token_id is not None:
        raise ValueError("forced_bos_token_id has no meaning for GLM (decoder-only: the prompt is already there)")
    for seq in s.bad_words_ids:
        for i in seq:
            if not 0 <= i < vocab:
                raise ValueError(f"bad_words_ids contains {i}, outside the vocabulary [0, {vocab})")
    return s


def _static_key(s: GenerationSettings) -> GenerationSettings:
    """The settings with every traced number blanked: what a compiled program depends on."""
    return dataclasses.replace(
        s, max_length=0, min_length=0, seed=0, decoder_start_token_id=0, pad_token_id=0,
        top_p=float(s.top_p < 1.0), temperature=float(s.temperature != 1.0), repetition_penalty=float(s.repetition_penalty != 1.0),
        eos_token_ids=(0,) * len(s.eos_token_ids),
        forced_eos_token_id=None if s.forced_eos_token_id is None else (0,) * len(s.forced_eos_token_id),
    )


def process(scores, tokens, cur, s: GenerationSettings, dyn, *, keep: int = 1):
    """transformers' processors and warpers on scores [N, V] given tokens [N, S] filled up to ``cur``."""
    return _process(scores, tokens, cur, s, dyn, log_probs=False, n_keep=keep)


def _dyn(s: GenerationSettings):
    return {
        "max_length": jnp.int32(s.max_length),
        "min_length": jnp.int32(s.min_length),
        "pad": jnp.int32(s.pad_token_id),
        "start": jnp.int32(0),
        "forced_bos": jnp.int32(0),
        "temperature": jnp.float32(s.temperature),
        "top_p": jnp.float32(s.top_p),
        "repetition_penalty": jnp.float32(s.repetition_penalty),
        "eos": jnp.asarray(s.eos_token_ids or (0,), jnp.int32)[: len(s.eos_token_ids)],
        "forced_eos": jnp.asarray(s.forced_eos_token_id or (0,), jnp.int32),
    }


def _greedy_or_sample(dec: Decoding, s: GenerationSettings, S: int):
    def run(params, inputs, dyn, key):
        ids = inputs["input_ids"]
        N, L = ids.shape
        static, cache = dec.start(params, inputs, S)
        tokens = jnp.full((N, S), dyn["pad"], jnp.int32).at[:, :L].set(ids)
        eos = dyn["eos"]

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
            nxt = jnp.where(c["alive"], nxt.astype(jnp.int32), dyn["pad"])
            alive = c["alive"] & ~jnp.any(nxt[:, None] == eos[None], axis=1)
            return {"tokens": c["tokens"].at[:, cur].set(nxt), "cache": cache, "cur": cur + 1, "alive": alive}

        c = {"tokens": tokens, "cache": cache, "cur": jnp.int32(L), "alive": jnp.ones((N,), bool)}
        c = jax.lax.while_loop(cond, body, c)
        return c["tokens"], c["cur"]

    return run


def _beam_step(dec: Decoding, s: GenerationSettings, K: int):
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


def _beam_search(model, dec, s: GenerationSettings, inputs, S: int):
    nb = s.num_beams
    ids = np.asarray(inputs["input_ids"])
    B, L = ids.shape
    K = max(2, 1 + len(s.eos_token_ids)) * nb
    key = ("glm-beam-start", S)
    start = model._decode_cache.get(key)
    if start is None:
        start = model._decode_cache[key] = jax.jit(lambda p, i: dec.start(p, i, S))
    key = ("glm-beam-step", _static_key(s), S)
    step = model._decode_cache.get(key)
    if step is None:
        step = model._decode_cache[key] = jax.jit(_beam_step(dec, s, K))
    rep = lambda x: jnp.repeat(x, nb, axis=0)
    static, cache = start(model.params, inputs)
    static, cache = jax.tree.map(rep, static), jax.tree.map(rep, cache)
    N = B * nb
    tokens = np.full((N, S), s.pad_token_id, np.int32)
    tokens[:, :L] = np.repeat(ids, nb, axis=0)
    beam_scores = np.zeros((B, nb), np.float32)
    beam_scores[:, 1:] = -1e9
    hyps = [_Hypotheses(nb, s.length_penalty, s.early_stopping, s.max_length) for _ in range(B)]
    done = np.zeros(B, bool)
    src = np.arange(N, dtype=np.int32)
    dyn = _dyn(s)
    eos = set(s.eos_token_ids)
    V = dec.vocab_size
    cur = L
    while True:
        cache, top, cand = step(model.params, static, cache, jnp.asarray(src), jnp.asarray(tokens), jnp.int32(cur),
                                jnp.asarray(beam_scores.reshape(N)), dyn)
        top, cand = np.asarray(top), np.asarray(cand)
        new_scores = np.zeros((B, nb), np.float32)
        new_tok = np.full((B, nb), s.pad_token_id, np.int32)
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
    out = np.full((len(best), width), s.pad_token_id, np.int64)
    for i, hyp in enumerate(best):
        out[i, : len(hyp)] = hyp
        if len(hyp) < width and s.eos_token_ids:
            out[i, len(hyp)] = s.eos_token_ids[0]
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
    if s.num_beams > 1:
        return _beam_search(model, dec, s, inputs, S)
    n = s.num_return_sequences if s.do_sample else 1
    if n > 1:
        inputs = {k: jnp.repeat(v, n, axis=0) for k, v in inputs.items()}
    key = ("glm-greedy", _static_key(s), S, "generation_attention_mask" in inputs)
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
