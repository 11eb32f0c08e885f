"""Training loop: sharded step == single-device step, params / optimizer state really split, gradient
accumulation == one big batch, exact resume after SIGKILL, SIGTERM checkpoints, resharded restore, NaN
stop, config errors, a tiny LongLM whose loss falls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from lmzoo.sharding import make_mesh
from lmzoo.train import config as C
from lmzoo.train.checkpoint import Checkpointer
from lmzoo.train.data import Loader
from lmzoo.train.loop import build_model, run
from lmzoo.train.mesh import global_batch
from lmzoo.train.objectives import make_objective
from lmzoo.train.tokenizer import load_tokenizer
from lmzoo.train.trainer import Trainer

DATA = os.path.join(os.path.dirname(__import__("lmzoo").__file__), "data")
CORPUS = os.path.join(DATA, "demo_corpus.txt")
SPIECE = os.path.join(DATA, "demo_spiece.model")
TINY_T5 = {"vocab_size": 600, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4,
           "eos_token_id": 2, "pad_token_id": 3, "decoder_start_token_id": 1}


def tiny_cfg(out_dir, **over) -> C.TrainConfig:
    d = {
        "model": {"family": "t5", "config": TINY_T5},
        "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "linear"},
        "data": {"train": CORPUS, "tokenizer": SPIECE, "batch_size": 8, "seq_len": 32, "target_len": 16, "prefetch": 1},
        "objective": {"name": "longlm"},
        "loop": {"steps": 8, "log_every": 1, "save_every": 2, "keep": 10, "out_dir": str(out_dir), "progress": False, "tensorboard": False},
    }
    return C.apply_overrides(C.TrainConfig.from_dict(d), [f"{k}={v}" for k, v in over.items()])


# ---- the sharded step ---------------------------------------------------------------------------------
def _step_on(shape, accum, batch_np):
    mesh = make_mesh(shape, devices=jax.devices()[: int(np.prod(list(shape.values())))])
    model = build_model(C.ModelSection(family="t5", config=TINY_T5), mesh)
    vocab = load_tokenizer(SPIECE).vocab
    obj = make_objective("longlm", vocab, C.DataSection(batch_size=8, seq_len=32, target_len=16))
    tr = Trainer(model, obj, C.OptimSection(lr=1e-3, accum_steps=accum), mesh, total_steps=10)
    state = tr.init_state(model.params)
    batch = global_batch(mesh, batch_np, 8)
    hlo = tr.compile_train(batch).as_text()
    state, metrics = tr.train_step(state, batch)
    return tr, state, jax.device_get(metrics), hlo


@pytest.fixture(scope="module")
def batch_np():
    vocab = load_tokenizer(SPIECE).vocab
    obj = make_objective("longlm", vocab, C.DataSection(batch_size=8, seq_len=32, target_len=16))
    rng = np.random.default_rng(0)
    return obj.build([rng.integers(4, 200, obj.example_len) for _ in range(8)], np.random.default_rng(1))


def test_sharded_step_equals_single_device_and_splits_state(batch_np):
    _, ref_state, ref_m, _ = _step_on({"data": 1}, 1, batch_np)
    tr, state, m, hlo = _step_on({"data": 2, "fsdp": 2, "tensor": 2}, 2, batch_np)
    # the same loss, gradient norm and gradient (Adam's first moment is (1 - b1) * grad)
    np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], ref_m["grad_norm"], rtol=1e-5)
    mu, ref_mu = state["opt_state"][1][0].mu, ref_state["opt_state"][1][0].mu
    for a, b in zip(jax.tree.leaves(mu), jax.tree.leaves(ref_mu)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-9)
    # params and optimizer moments are split over fsdp (embed side) and tensor (mlp side)
    wi = state["params"]["encoder"]["block_0"]["mlp"]["wi"]["kernel"]
    assert wi.shape == (32, 64)
    assert {s.data.shape for s in wi.addressable_shards} == {(16, 32)}
    nu_wi = state["opt_state"][1][0].nu["encoder"]["block_0"]["mlp"]["wi"]["kernel"]
    assert {s.data.shape for s in nu_wi.addressable_shards} == {(16, 32)}
    emb = state["params"]["shared"]["embedding"]
    assert {s.data.shape for s in emb.addressable_shards} == {(TINY_T5["vocab_size"] // 2, 16)}
    assert "all-reduce" in hlo or "reduce-scatter" in hlo
    assert "all-gather" in hlo


# ---- checkpoints: exact resume, SIGTERM, resharding ---------------------------------------------------
CHILD = textwrap.dedent(
    """
    import os, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_compilation_cache_dir", {cache!r})  # the children share their compiled step
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    sys.path.insert(0, {tests!r})
    from test_train import tiny_cfg
    from lmzoo.train import trainer, loop
    slow_after = int(sys.argv[2])
    orig = trainer.Trainer.train_step
    def slow(self, state, batch):
        out = orig(self, state, batch)
        if int(jax.device_get(out[0]["step"])) >= slow_after:
            time.sleep(1.0)  # a window for the test to kill us in
        return out
    trainer.Trainer.train_step = slow
    res = loop.run(tiny_cfg(sys.argv[1], **dict(a.split("=", 1) for a in sys.argv[3:])), resume=True)
    sys.exit(res.exit_code)
    """
)


def _losses(out_dir):
    by_step = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line the child is still writing
                continue
            if r["split"] == "train":
                by_step[r["step"]] = r["loss"]  # a resumed run re-logs steps after its checkpoint; last wins
    return by_step


def _wait_for_checkpoint(ckpt_dir, step, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(os.path.join(ckpt_dir, str(step), "commit_success.txt")) or (
            os.path.isdir(os.path.join(ckpt_dir, str(step))) and os.path.exists(os.path.join(ckpt_dir, str(step), "_CHECKPOINT_METADATA"))
        ):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the child exited early ({proc.returncode}): {proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax-cache")


def _child(tmp_path, cache, out_dir, slow_after, *overrides):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=os.path.dirname(__file__), cache=str(cache)))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    return subprocess.Popen([sys.executable, str(script), str(out_dir), str(slow_after), *overrides], env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, jax_cache):
    """An uninterrupted run, in a child process set up exactly as the interrupted ones (flags, config,
    compilation cache): the bitwise comparison is then between runs that differ only in the kill."""
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "run"
    p = _child(tmp, jax_cache, out, 99)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-3000:]
    assert max(_losses(out)) == 8
    return out


def _final_params(out_dir, mesh_shape={"data": 1}):
    cfg = tiny_cfg(out_dir)
    mesh = make_mesh(mesh_shape, devices=jax.devices()[: int(np.prod(list(mesh_shape.values())))])
    model = build_model(cfg.model, mesh, init=False)
    tok = load_tokenizer(SPIECE)
    tr = Trainer(model, make_objective("longlm", tok.vocab, cfg.data), cfg.optim, mesh, total_steps=cfg.loop.steps)
    ck = Checkpointer(os.path.join(out_dir, "checkpoints"))
    step, state, data = ck.restore(tr.abstract_state())
    ck.close()
    return step, state, data


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, jax_cache, reference_run):
    out = tmp_path / "run"
    p = _child(tmp_path, jax_cache, out, 4)
    _wait_for_checkpoint(out / "checkpoints", 4, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert Checkpointer(str(out / "checkpoints")).latest_step() < 8
    p = _child(tmp_path, jax_cache, out, 99)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-3000:]
    assert _losses(out) == _losses(reference_run)
    step, state, data = _final_params(out)
    ref_step, ref_state, ref_data = _final_params(reference_run)
    assert step == ref_step == 8 and data == ref_data
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_writes_a_checkpoint_of_the_last_step(tmp_path, jax_cache):
    out = tmp_path / "run"
    p = _child(tmp_path, jax_cache, out, 3, "loop.save_every=0")
    t0 = time.time()
    while not os.path.exists(out / "metrics.jsonl") or max(_losses(out), default=0) < 3:
        assert p.poll() is None and time.time() - t0 < 240, "the child did not reach step 3"
        time.sleep(0.1)
    assert Checkpointer(str(out / "checkpoints")).latest_step() is None
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err.decode()[-3000:]
    latest = Checkpointer(str(out / "checkpoints")).latest_step()
    assert latest is not None and 3 <= latest < 8  # written by the SIGTERM handler (no periodic saves)
    step, state, data = _final_params(out)
    assert step == latest == data["step"] == int(state["step"])
    ref = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert ref["step"] == latest


def test_restore_onto_another_mesh_shape(reference_run):
    _, a, _ = _final_params(reference_run, {"data": 1})
    _, b, _ = _final_params(reference_run, {"data": 4, "fsdp": 1, "tensor": 2})
    wi = b["params"]["encoder"]["block_0"]["mlp"]["wi"]["kernel"]
    assert {s.data.shape for s in wi.addressable_shards} == {(32, 32)}
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_reloads_with_from_pretrained(reference_run):
    import lmzoo

    model = lmzoo.from_pretrained(os.path.join(reference_run, "model"))
    _, state, _ = _final_params(reference_run)
    for x, y in zip(jax.tree.leaves(model.params), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    cfg = tiny_cfg(out, **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "optim.lr": 1e30, "optim.warmup_steps": 0,
                           "optim.clip_norm": 0, "loop.steps": 6})
    res = run(cfg, devices=jax.devices()[:1])
    assert res.status == "nan" and res.exit_code == 1
    ck = Checkpointer(str(out / "checkpoints"))
    steps = ck.all_steps()
    assert all(s < res.step for s in steps)
    if steps:
        _, state, _ = _final_params(out)
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))


def test_existing_checkpoints_need_resume(reference_run):
    with pytest.raises(C.TrainConfigError, match="--resume"):
        run(tiny_cfg(reference_run))


# ---- loss falls ---------------------------------------------------------------------------------------
def test_tiny_longlm_loss_falls_in_bf16_with_z_loss(tmp_path):
    # 60 steps: the demo tokenizer's pieces are mostly whole words, so each token carries more to learn
    cfg = tiny_cfg(tmp_path / "fall", **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "loop.steps": 60, "loop.log_every": 5, "loop.save_every": 0,
                                         "optim.lr": 1e-2, "optim.warmup_steps": 5, "model.dtype": "bfloat16", "loop.z_loss": 1e-4})
    res = run(cfg, devices=jax.devices()[:1])
    losses = _losses(tmp_path / "fall")
    assert res.status == "done"
    assert losses[60] < 0.8 * losses[5], losses
    rows = [json.loads(l) for l in open(tmp_path / "fall" / "metrics.jsonl")]
    assert all(r["loss"] > r["nll"] for r in rows)  # the z-loss term is in the loss, not in the nll
    import lmzoo

    model = lmzoo.from_pretrained(tmp_path / "fall" / "model")
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(model.params))  # float32 params, bf16 compute


def test_adafactor_state_is_placed():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = build_model(C.ModelSection(family="t5", config=TINY_T5), mesh)
    obj = make_objective("longlm", load_tokenizer(SPIECE).vocab, C.DataSection(batch_size=8, seq_len=32, target_len=16))
    tr = Trainer(model, obj, C.OptimSection(name="adafactor", lr=1e-2), mesh, total_steps=10)
    state = tr.init_state(model.params)
    for leaf, sh in zip(jax.tree.leaves(state["opt_state"]), jax.tree.leaves(tr.state_shardings["opt_state"])):
        assert leaf.sharding == sh
    # a full-size second moment follows its param; factored rows / columns (and their placeholders) are replicated
    fs = state["opt_state"][1][0]
    v = fs.v["encoder"]["block_0"]["mlp"]["wi"]["kernel"]  # dims < 128 are not factored
    assert v.shape == (32, 64) and {s.data.shape for s in v.addressable_shards} == {(16, 32)}
    assert fs.v_row["encoder"]["block_0"]["mlp"]["wi"]["kernel"].sharding.is_fully_replicated


# ---- loader and config --------------------------------------------------------------------------------
def test_loader_is_a_pure_function_of_step():
    ex = [np.full(4, i) for i in range(10)]
    build = lambda xs, rng: {"x": np.stack(xs), "r": rng.integers(0, 1 << 30, len(xs))}
    a = Loader(ex, build, batch_size=4, seed=3, prefetch=2)
    seq = [next(a) for _ in range(6)]
    b = Loader(ex, build, batch_size=4, seed=3, prefetch=0)
    b.restore(a.state() | {"step": 3})
    for want, got in zip(seq[3:], [next(b) for _ in range(3)]):
        np.testing.assert_array_equal(want["x"], got["x"])
        np.testing.assert_array_equal(want["r"], got["r"])
    # each epoch is a permutation; host rows split the global batch
    firsts = np.concatenate([s["x"][:, 0] for s in seq[:5]])[:10]
    assert sorted(firsts) == list(range(10))
    h0 = Loader(ex, build, batch_size=4, rows=(0, 2), seed=3, prefetch=0).batch(1)
    h1 = Loader(ex, build, batch_size=4, rows=(2, 4), seed=3, prefetch=0, host=1).batch(1)
    np.testing.assert_array_equal(np.concatenate([h0["x"], h1["x"]]), seq[1]["x"])
    with pytest.raises(C.TrainConfigError, match="batch_size"):
        b.restore({"step": 0, "batch_size": 8})
    a.close()


def test_config_errors_are_clear(tmp_path):
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(C.TrainConfigError, match="unknown key optim.learning_rate"):
        C.apply_overrides(cfg, ["optim.learning_rate=1"])
    with pytest.raises(C.TrainConfigError, match="optim.lr must be a number"):
        C.apply_overrides(cfg, ["optim.lr=fast"])
    with pytest.raises(C.TrainConfigError, match="optim.schedule"):
        C.apply_overrides(cfg, ["optim.schedule=weird"])
    with pytest.raises(C.TrainConfigError, match="unknown config section"):
        C.TrainConfig.from_dict({"modle": {}})
    with pytest.raises(C.TrainConfigError, match="not divisible"):
        C.apply_overrides(cfg, ["optim.accum_steps=3"])
    with pytest.raises(C.TrainConfigError, match="no such corpus"):
        run(C.apply_overrides(cfg, [f"data.train={tmp_path}/missing.txt"]))
    with pytest.raises(C.TrainConfigError, match="model.config"):
        run(C.apply_overrides(cfg, ["model.config.d_modell=8"]))
    assert C.apply_overrides(cfg, ["model.config.d_model=64", "loop.metrics=rouge,bleu"]).model.config["d_model"] == 64
    from lmzoo.train.cli import main

    assert main([str(tmp_path / "nope.json")]) == 2


def test_schedules():
    from lmzoo.train.optim import make_schedule

    lin = make_schedule(C.OptimSection(lr=1.0, warmup_steps=10, schedule="linear"), 110)
    assert float(lin(4)) == pytest.approx(0.5) and float(lin(9)) == pytest.approx(1.0) and float(lin(110)) == pytest.approx(0.0)
    inv = make_schedule(C.OptimSection(lr=1.0, warmup_steps=4, schedule="inverse_sqrt"), 100)
    assert float(inv(15)) == pytest.approx(0.5)
    noam = make_schedule(C.OptimSection(lr=1e-3, warmup_steps=100, schedule="noam"), 1000)
    assert float(noam(99)) == pytest.approx(1e-3 * 100**-0.5) and float(noam(399)) == pytest.approx(1e-3 * 400**-0.5)
