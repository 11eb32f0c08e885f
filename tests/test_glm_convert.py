"""GLM checkpoints: Megatron model-parallel merge == the unsharded model, prefix / no-prefix and fp16 hub files,
the streaming converter, and clear errors for broken inputs."""

import argparse
import json
import os

import numpy as np
import pytest

import lmzoo
from lmzoo.convert.glm import MergedTensor, convert_glm_checkpoint, merge_rule, open_megatron_checkpoint
from lmzoo.convert.keymap import ConversionError
from lmzoo.convert.torch_pickle import CheckpointError
from lmzoo.convert.writers import export_tensors
from lmzoo.glm import GLMConfig, GLMForConditionalGeneration

from .conftest import require

HF = {
    "architectures": ["GLMModel"], "model_type": "glm", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
    "max_sequence_length": 16, "vocab_size": 64, "attention_scale": 1.0, "block_position_encoding": True, "output_predict": True,
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random tiny GLM, its original-layout state dict and an hub-style folder (no prefix, float32)."""
    torch = require("torch")
    cfg = GLMConfig.from_hf_config(HF)
    model = GLMForConditionalGeneration(cfg, seed=0)
    sd = {k: np.array(t.get()) for k, t in export_tensors(model.params, model.key_map(cfg)).items()}
    d = tmp_path_factory.mktemp("hub")
    (d / "config.json").write_text(json.dumps(HF))
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, d / "pytorch_model.bin")
    return model, sd, str(d)


def _split(key, a, p):
    rule, dim = merge_rule(key)
    if rule == "replicated":
        return [a] * p
    if rule == "cat":
        return np.split(a, p, axis=dim)
    q, k, v = np.split(a, 3, axis=0)
    return [np.concatenate([q_, k_, v_]) for q_, k_, v_ in zip(np.split(q, p), np.split(k, p), np.split(v, p))]


def _write_megatron(torch, root, sd, p):
    it = root / "release"
    it.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    parts = {k: _split(k, a, p) for k, a in sd.items()}
    for r in range(p):
        module = {k: torch.from_numpy(np.ascontiguousarray(parts[k][r])) for k in sd}
        torch.save({"module": module, "iteration": 1000, "args": argparse.Namespace(model_parallel_size=p)}, it / f"mp_rank_{r:02d}_model_states.pt")


def _inputs():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 64, (2, 10))
    pos = np.stack([np.stack([np.r_[np.arange(6), [3] * 4], np.r_[[0] * 6, 1 + np.arange(4)]])] * 2)
    return dict(input_ids=ids, position_ids=pos, attention_mask=np.array([6, 6]))


@pytest.mark.parametrize("p", [2, 4])
def test_megatron_merge_equals_unsharded(reference, tmp_path, p):
    torch = require("torch")
    model, sd, hub = reference
    _write_megatron(torch, tmp_path / "ckpt", sd, p)
    merged = open_megatron_checkpoint(tmp_path / "ckpt")
    assert set(merged) == set(sd)
    for k, a in sd.items():
        assert isinstance(merged[k], MergedTensor) and merged[k].shape == a.shape
        np.testing.assert_array_equal(merged[k].numpy(), a, err_msg=k)
    # and through the converter: the converted folder computes what the unsharded hub folder computes
    out = convert_glm_checkpoint(tmp_path / "ckpt", tmp_path / "converted", HF)
    a = lmzoo.from_pretrained(out)(**_inputs()).logits
    b = lmzoo.from_pretrained(hub)(**_inputs()).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_qkv_merge_is_by_thirds():
    """Shard k holds [Q_k; K_k; V_k]; the merge must not simply concatenate the shards."""

    class Part:
        def __init__(self, a):
            self.a, self.shape, self.dtype = a, a.shape, a.dtype

        def numpy(self):
            return self.a

    s0 = np.array([0, 1, 10, 11, 20, 21])  # Q0 Q0 K0 K0 V0 V0
    s1 = np.array([2, 3, 12, 13, 22, 23])
    m = MergedTensor("transformer.layers.0.attention.query_key_value.bias", [Part(s0), Part(s1)])
    np.testing.assert_array_equal(m.numpy(), [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23])
    assert merge_rule("glm.transformer.layers.3.attention.dense.weight") == ("cat", 1)
    assert merge_rule("transformer.layers.3.attention.dense.bias") == ("replicated", 0)
    assert merge_rule("transformer.layers.3.mlp.dense_h_to_4h.bias") == ("cat", 0)


def test_prefix_and_fp16_hub_files(reference, tmp_path):
    torch = require("torch")
    model, sd, hub = reference
    d = tmp_path / "prefixed-fp16"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(HF))
    torch.save({"glm." + k: torch.from_numpy(v.astype(np.float16)) for k, v in sd.items()}, d / "pytorch_model.bin")
    m = lmzoo.from_pretrained(str(d))
    plain = lmzoo.from_pretrained(hub)
    import jax

    for (pa, a), (pb, b) in zip(jax.tree_util.tree_leaves_with_path(m.params), jax.tree_util.tree_leaves_with_path(plain.params)):
        assert a.dtype == np.float32  # fp16 files are upcast
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(np.float16).astype(np.float32), err_msg=str(pa))
    # safetensors export keeps the hub names (no prefix) and round-trips
    out = plain.save_pretrained(tmp_path / "st", format="safetensors")
    from lmzoo.convert.checkpoint import open_checkpoint

    assert set(open_checkpoint(out)) == set(sd)
    np.testing.assert_array_equal(np.asarray(lmzoo.from_pretrained(out)(**_inputs()).logits), np.asarray(plain(**_inputs()).logits))


def test_converter_copies_rows_and_keeps_fp16(reference, tmp_path):
    torch = require("torch")
    model, sd, hub = reference
    d = tmp_path / "fp16"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(HF))
    torch.save({k: torch.from_numpy(v.astype(np.float16)) for k, v in sd.items()}, d / "pytorch_model.bin")
    out = convert_glm_checkpoint(str(d), tmp_path / "out", HF, copy_rows={9: 7})
    from lmzoo.convert.checkpoint import open_checkpoint

    st = open_checkpoint(out)
    emb = st["word_embeddings.weight"].numpy()
    assert emb.dtype == np.float16
    np.testing.assert_array_equal(emb[9], emb[7])
    np.testing.assert_array_equal(np.delete(emb, 9, 0), np.delete(sd["word_embeddings.weight"].astype(np.float16), 9, 0))


def test_broken_checkpoints_fail_clearly(reference, tmp_path):
    torch = require("torch")
    model, sd, hub = reference
    d = tmp_path / "missing"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(HF))
    torch.save({k: torch.from_numpy(v) for k, v in sd.items() if "layers.1.mlp.dense_4h_to_h.weight" not in k}, d / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"transformer\.layers\.1\.mlp\.dense_4h_to_h\.weight"):
        lmzoo.from_pretrained(str(d))
    wrong = dict(HF, hidden_size=64, num_attention_heads=4)
    (d / "config.json").write_text(json.dumps(wrong))
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, d / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="word_embeddings.weight"):
        lmzoo.from_pretrained(str(d))
    # a model-parallel rank is missing
    _write_megatron(torch, tmp_path / "mp", sd, 4)
    os.remove(tmp_path / "mp" / "release" / "mp_rank_02_model_states.pt")
    with pytest.raises(CheckpointError, match="shard is missing"):
        open_megatron_checkpoint(tmp_path / "mp")


def test_lmzoo_convert_cli_merges_megatron_shards(reference, tmp_path):
    torch = require("torch")
    from lmzoo.convert.cli import main as convert_main

    model, sd, hub = reference
    _write_megatron(torch, tmp_path / "ckpt", sd, 2)
    (tmp_path / "config.json").write_text(json.dumps(HF))
    assert convert_main([str(tmp_path / "ckpt"), str(tmp_path / "out"), "-q"]) == 1  # no config: a clear error
    assert not (tmp_path / "out").exists()
    assert convert_main([str(tmp_path / "ckpt"), str(tmp_path / "out"), "--config", str(tmp_path / "config.json"), "-q"]) == 0
    a = lmzoo.from_pretrained(str(tmp_path / "out"))(**_inputs()).logits
    b = lmzoo.from_pretrained(hub)(**_inputs()).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
