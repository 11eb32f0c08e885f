"""The training loop: build everything from a :class:`TrainConfig`, train, evaluate, checkpoint, export.

Guarantees:
* exact resume — the checkpoint holds params, optimizer state, step, RNG and the loader position, and
  batches are pure functions of (seed, step, host), so a resumed run continues bit for bit;
* SIGTERM saves a checkpoint of the last completed step and exits (exit code 143);
* a NaN/inf loss or gradient norm stops the run without saving, so the last good checkpoint is kept;
* at the end the model is exported with ``save_pretrained`` to ``OUT/model`` (loadable by
  ``lmzoo.from_pretrained``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint import Checkpointer
from .config import ModelSection, TrainConfig, TrainConfigError
from .data import Loader, make_examples, read_corpus
from .logger import MetricsLogger, Progress, Throughput, peak_flops_per_device
from .mesh import global_batch, host_rows, mesh_from_config
from .metrics import METRICS
from .objectives import make_objective
from .packing import pack_groups
from .tokenizer import Tokenizer, load_tokenizer
from .trainer import Trainer

__all__ = ["run", "RunResult", "build_model", "decode", "evaluate"]

EXIT_PREEMPTED = 143  # what a plain SIGTERM would give, but with a checkpoint written first


@dataclasses.dataclass
class RunResult:
    status: str  # done | preempted | nan
    step: int
    metrics: dict
    out_dir: str
    eval_metrics: dict = dataclasses.field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return {"done": 0, "preempted": EXIT_PREEMPTED, "nan": 1}[self.status]


def build_model(m: ModelSection, mesh=None, *, init: bool = True):
    """A model from a checkpoint (``m.init``) or a random one of ``m.family`` with ``m.config`` fields,
    its params initialised directly onto ``mesh``'s shardings (``init=False``: no params, e.g. to restore)."""
    import lmzoo
    from lmzoo.configuration import ConfigError
    from lmzoo.modeling import model_class_for

    try:
        if m.init:
            return lmzoo.from_pretrained(m.init, dtype=m.dtype, param_dtype=m.param_dtype)
        cls = model_class_for(m.family, dict(m.config))
        try:
            config = cls.config_class(**_nested(cls.config_class, m.config), dtype=m.dtype, param_dtype=m.param_dtype)
        except TypeError as e:
            raise TrainConfigError(f"model.config: {e}") from None
    except ConfigError as e:
        raise TrainConfigError(f"model: {e}") from None
    model = cls(config, params={})
    if not init:
        return model
    shardings = model.param_shardings(mesh) if mesh is not None else None
    init = jax.jit(lambda r: nn.unbox(model.init_call(r, **model.dummy_inputs())["params"]), out_shardings=shardings)
    model.params = init(jax.random.PRNGKey(m.seed))
    return model


def _nested(config_class, values) -> dict:
    """Build nested config dataclasses (PALM's ``bert`` encoder config) from plain dicts."""
    import typing

    hints = typing.get_type_hints(config_class)
    out = dict(values)
    for k, v in values.items():
        t = hints.get(k)
        if isinstance(v, dict) and dataclasses.is_dataclass(t):
            out[k] = t(**v)
        elif isinstance(v, list) and typing.get_origin(t) is tuple:
            out[k] = tuple(v)
    return out


def _tokenizer(cfg: TrainConfig) -> Tokenizer:
    path = cfg.data.tokenizer or cfg.model.init
    if not path:
        raise TrainConfigError("no tokenizer: set data.tokenizer (or model.init to a folder that has one)")
    return load_tokenizer(path)


# ---- decoding and evaluation ---------------------------------------------------------------------
def _greedy(model, params, input_ids, attention_mask, max_len: int, start: int, eos: Optional[int]) -> np.ndarray:
    """Greedy decoding through the plain forward (no cache): the fallback when ``generate`` is absent."""
    B = input_ids.shape[0]

    @jax.jit
    def step(params, ids, mask, dec, t):
        logits = model.forward(params, input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        nxt = jnp.argmax(logits[:, t], axis=-1).astype(dec.dtype)
        return dec.at[:, t + 1].set(nxt)

    dec = jnp.full((B, max_len), model.config.pad_token_id, jnp.int32).at[:, 0].set(start)
    for t in range(max_len - 1):
        dec = step(params, jnp.asarray(input_ids), jnp.asarray(attention_mask), dec, t)
        if eos is not None and bool(jnp.all(jnp.any(dec[:, 1 : t + 2] == eos, axis=1))):
            break
    return np.asarray(dec)


def decode(model, params, input_ids, attention_mask, *, max_len: int, start: int, eos: Optional[int]) -> np.ndarray:
    """Greedy ids [B, T] (decoder start first): ``model.generate`` when the shared search is available,
    else greedy decoding through the forward."""
    try:
        from lmzoo.generation import generate  # noqa: F401
    except ImportError:
        return _greedy(model, params, input_ids, attention_mask, max_len, start, eos)
    saved = model.params
    model.params = params
    try:
        return np.asarray(
            model.generate(
                np.asarray(input_ids), attention_mask=np.asarray(attention_mask), max_length=max_len, num_beams=1,
                do_sample=False, decoder_start_token_id=start, eos_token_id=eos,
            )
        )
    finally:
        model.params = saved


def _strip(ids: Sequence[int], eos: Optional[int], start: Optional[int] = None) -> list[int]:
    out = []
    for i, t in enumerate(ids):
        if i == 0 and start is not None and t == start:
            continue
        if t == eos:
            break
        if t >= 0:
            out.append(int(t))
    return out


def evaluate(trainer: Trainer, params, loader: Loader, n_batches: int, *, mesh, batch_size: int, metrics=(), tokenizer=None, gen_len=64) -> dict:
    """Loss (and accuracy) over ``n_batches`` eval batches, plus the requested card metrics."""
    objective = trainer.objective
    totals: dict[str, float] = {}
    preds: list = []
    refs: list = []
    for i in range(n_batches):
        b = loader.batch(i)
        sums = jax.device_get(trainer.eval_step(params, global_batch(mesh, b, batch_size)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        if metrics:
            p, r = _predictions(trainer.model, params, objective, b, tokenizer, gen_len)
            preds += p
            refs += r
    count = max(totals.get("count", 0.0), 1.0)
    out = {k: v / count for k, v in totals.items() if k != "count"}
    if "correct" in out:
        out["accuracy"] = out.pop("correct")
    if "nll" in out:
        out["ppl"] = math.exp(min(out["nll"], 50.0))
    done = set()
    for name in metrics:
        kind, fn = METRICS[name]
        if fn in done or not preds:
            continue
        done.add(fn)
        out.update(fn(preds, refs))
    return out


def _predictions(model, params, objective, batch, tokenizer, gen_len):
    if objective.kind in ("pairs", "tokens"):
        if "decoder_input_ids" in batch:
            start, eos = int(batch["decoder_input_ids"][0, 0]), objective.vocab.eos
        else:  # PALM: labels hold the start token, and the model's config its ids
            start, eos = int(batch["labels"][0, 0]), model.config.eos_token_id
        ids = decode(model, params, batch["input_ids"], batch["attention_mask"], max_len=gen_len, start=start, eos=eos)
        preds = [tokenizer.decode(_strip(row, eos, start)) for row in ids]
        refs = [tokenizer.decode(_strip(row, eos, start)) for row in batch["labels"]]
        return preds, refs
    if objective.kind == "labels":
        out = model.forward(params, input_ids=jnp.asarray(batch["input_ids"]), attention_mask=jnp.asarray(batch["attention_mask"]))
        logits = np.asarray(out.logits)
        p = logits[:, 0] if logits.shape[-1] == 1 else logits.argmax(-1)
        return list(p), list(batch["labels"])
    if objective.kind == "spans":
        out = model.forward(params, input_ids=jnp.asarray(batch["input_ids"]), attention_mask=jnp.asarray(batch["attention_mask"]))
        s, e = np.asarray(out.start_logits), np.asarray(out.end_logits)
        preds, refs = [], []
        for i in range(s.shape[0]):
            L = int(batch["attention_mask"][i].sum())
            score = s[i, :L, None] + e[i, None, :L]
            score = np.where(np.triu(np.ones((L, L), bool)), score, -np.inf)
            a, b = np.unravel_index(np.argmax(score), score.shape)
            preds.append("" if a == 0 else tokenizer.decode(batch["input_ids"][i, a : b + 1]))
            gs, ge = int(batch["start_positions"][i]), int(batch["end_positions"][i])
            refs.append([] if gs == 0 else [tokenizer.decode(batch["input_ids"][i, gs : ge + 1])])
        return preds, refs
    return [], []


# ---- the run ---------------------------------------------------------------------------------------
class _Preemption:
    """SIGTERM sets a flag the loop polls between steps (handler installed from the main thread only)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _finite(m: dict) -> bool:
    return all(math.isfinite(float(m[k])) for k in ("loss", "grad_norm") if k in m)


def _fmt(m: dict) -> dict:
    out = {"loss": f"{m['loss']:.4f}"}
    if "tokens_per_s" in m:
        out["tok/s"] = f"{m['tokens_per_s']:.0f}"
    if "mfu" in m:
        out["mfu"] = f"{100 * m['mfu']:.1f}%"
    return out


def run(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    tokenizer: Optional[Tokenizer] = None,
    train_examples: Optional[Sequence[Any]] = None,
    eval_examples: Optional[Sequence[Any]] = None,
    devices=None,
    stop_after: Optional[int] = None,
) -> RunResult:
    """Train as ``cfg`` says. ``train_examples`` / ``eval_examples`` bypass reading the corpus (already
    in the objective's example kind); ``stop_after`` ends the loop early after that many steps of this
    invocation (used by tests and benchmarks), without the final export."""
    out_dir = os.path.abspath(cfg.loop.out_dir)
    tokenizer = tokenizer or _tokenizer(cfg)
    train_docs = read_corpus(cfg.data.train, cfg.data.format) if train_examples is None else None
    eval_docs = read_corpus(cfg.data.eval, cfg.data.format) if eval_examples is None and cfg.data.eval else None
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=cfg.loop.keep, async_save=cfg.loop.async_save)
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        ckpt.close()
        raise TrainConfigError(f"{out_dir} already has checkpoints (latest step {latest}); pass --resume or use another loop.out_dir")
    mesh = mesh_from_config(cfg.mesh, devices)
    model = build_model(cfg.model, mesh)
    objective = make_objective(cfg.objective.name, tokenizer.vocab, cfg.data, cfg.objective.options, model_config=model.config)
    if objective.families and model.family not in objective.families:
        raise TrainConfigError(f"objective {objective.name!r} trains {objective.families}, not a {model.family!r} model")
    if train_docs is not None:
        train_examples = make_examples(train_docs, tokenizer, objective, cfg.data, cfg.data.train, pack=cfg.data.pack)
    if eval_docs is not None:
        eval_examples = make_examples(eval_docs, tokenizer, objective, cfg.data, cfg.data.eval)

    B = cfg.data.batch_size
    rows = host_rows(B)
    build = objective.build
    if cfg.data.pack:  # rows are groups of examples, fixed once per run (eval batches stay one example per row)
        train_examples = pack_groups(train_examples, objective.pack_lengths, cfg.data.seq_len, cfg.data.target_len, seed=cfg.data.seed)
        build = objective.build_packed
    # the background thread builds each batch, counts its tokens and puts it on the mesh, a few steps ahead
    put = lambda b: (objective.num_tokens(b) * jax.process_count(), global_batch(mesh, b, B))  # noqa: E731
    loader = Loader(train_examples, build, batch_size=B, rows=rows, seed=cfg.data.seed, host=jax.process_index(),
                    prefetch=cfg.data.prefetch, put=put)
    total = cfg.loop.steps
    trainer = Trainer(model, objective, cfg.optim, mesh, total_steps=total, z_loss=cfg.loop.z_loss)
    if latest is not None:
        step, state, data_state = ckpt.restore(trainer.abstract_state())
        loader.restore(data_state)
        model.params = None
    else:
        step = 0
        state = trainer.init_state(model.params, seed=cfg.data.seed, copy=False)
        model.params = None
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            import json

            json.dump(cfg.to_dict(), f, indent=2)

    logger = MetricsLogger(out_dir, tensorboard=cfg.loop.tensorboard)
    progress = Progress(total, initial=step, enabled=cfg.loop.progress)
    peak = peak_flops_per_device(cfg.loop.peak_flops)
    status, last, eval_metrics = "done", {}, {}
    last_saved = latest
    start_step = step
    thr = None
    pending = None  # (step, metrics on device) of a log step, written once the next step is queued

    def report(at: int, metrics) -> bool:
        """Fetch, check and write one step's metrics; False (and a message) when they are not finite.

        The throughput window closes here, once step ``at`` has finished (its metrics are fetched), so a
        window times executed steps, not their dispatch (which runs ahead of the device)."""
        nonlocal last
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        timing = thr.read()
        if not _finite(m):
            progress.write(f"step {at}: loss {m.get('loss')} / grad norm {m.get('grad_norm')} is not finite; stopping "
                           f"(last good checkpoint: step {last_saved})")
            logger.log(at, m)
            return False
        m.update(timing)
        last = m
        logger.log(at, m)
        progress.update_to(at, _fmt(m))
        return True

    try:
        with _Preemption() as preempt:
            while step < total:
                if preempt.requested:
                    status = "preempted"
                    break
                if stop_after is not None and step - start_step >= stop_after:
                    break
                tokens, batch = next(loader)
                state, metrics = trainer.train_step(state, batch)
                if thr is None:
                    thr = Throughput(trainer.flops_per_step, peak)
                step += 1
                # A log step's values are fetched after the next step is queued, so the device never idles
                # while the host reads, checks and writes them; a step that saves or evaluates (and the
                # last) is checked at once, so a checkpoint never holds a non-finite step.
                if pending is not None:
                    ok = report(*pending)
                    pending = None
                    if not ok:
                        status = "nan"
                        break
                thr.add(tokens)
                save_now = cfg.loop.save_every and step % cfg.loop.save_every == 0
                eval_now = cfg.loop.eval_every and step % cfg.loop.eval_every == 0 and eval_examples is not None
                if step % cfg.loop.log_every == 0 or save_now or step == total:
                    if save_now or eval_now or step == total:
                        if not report(step, metrics):
                            status = "nan"
                            break
                    else:
                        pending = (step, metrics)
                if save_now:
                    ckpt.save(step, state, loader.state())
                    last_saved = step
                if eval_now:
                    eval_metrics = _run_eval(cfg, trainer, state, eval_examples, objective, tokenizer, mesh)
                    logger.log(step, eval_metrics, split="eval")
                    progress.write(f"step {step} eval: " + ", ".join(f"{k}={v:.4g}" for k, v in eval_metrics.items()))
            if pending is not None and status != "nan" and not report(*pending):
                status = "nan"
            if status == "preempted" or (status == "done" and step != last_saved):
                m = {k: float(v) for k, v in jax.device_get(metrics).items()} if step > start_step else {}
                if _finite(m):
                    ckpt.save(step, state, loader.state(), force=True)
                    last_saved = step
            ckpt.wait()
        if status == "done" and step >= total:
            if eval_examples is not None and not cfg.loop.eval_every:
                eval_metrics = _run_eval(cfg, trainer, state, eval_examples, objective, tokenizer, mesh)
                logger.log(step, eval_metrics, split="eval")
            model.params = state["params"]
            if jax.process_index() == 0:
                model.save_pretrained(os.path.join(out_dir, "model"))
        elif status == "done":
            model.params = state["params"]
    finally:
        progress.close()
        logger.close()
        ckpt.close()
        loader.close()
    return RunResult(status=status, step=step, metrics=last, out_dir=out_dir, eval_metrics=eval_metrics)


def _run_eval(cfg, trainer, state, examples, objective, tokenizer, mesh) -> dict:
    B = cfg.data.batch_size
    loader = Loader(examples, objective.build, batch_size=B, rows=host_rows(B), seed=cfg.data.seed + 1, shuffle=False, prefetch=0)
    n = cfg.loop.eval_batches or max(1, math.ceil(len(examples) / B))
    return evaluate(
        trainer, state["params"], loader, n, mesh=mesh, batch_size=B, metrics=cfg.loop.metrics, tokenizer=tokenizer,
        gen_len=cfg.loop.generate_max_len,
    )
