"""COCO-LM: parity cases through the public API, the bucket table, checkpoint forms (fp16, prefixes,
unknown keys, fairseq), export round trips, the pretraining heads and bad input."""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmzoo
from lmzoo.cocolm import CocoLMConfig, CocoLMModule, relative_position_bucket, relative_position_bucket_table
from lmzoo.configuration import ConfigError
from lmzoo.convert.checkpoint import open_checkpoint
from lmzoo.convert.keymap import ConversionError, flatten_tree
from lmzoo.convert.writers import ExportTensor, write_torch_zip

from .conftest import require
from .parity import assert_close, case_dir, cases, load_npz

CASES = cases(("cocolm",))


def _outputs(name):
    return load_npz(name, "outputs.npz")


def _write_bin(path, arrays: dict) -> None:
    """A torch-zip checkpoint of numpy arrays (torch-free)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_torch_zip(path, {k: ExportTensor(a.shape, a.dtype, (lambda a=a: np.ascontiguousarray(a))) for k, a in arrays.items()})


def _read_arrays(folder) -> dict:
    sd = open_checkpoint(folder)
    return {k: np.asarray(sd[k].numpy()) for k in sd}


def _copy_case(name, tmp_path, arrays, config=None) -> str:
    out = str(tmp_path / name)
    _write_bin(os.path.join(out, "pytorch_model.bin"), arrays)
    with open(os.path.join(case_dir(name), "config.json")) as f:
        cfg = json.load(f)
    cfg.update(config or {})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out


# ----------------------------------------------------------------------------------------------------
# parity
def test_all_cocolm_cases_present():
    assert CASES == ["cocolm-base-like", "cocolm-cls", "cocolm-heads", "cocolm-large-like", "cocolm-qa"]


@pytest.mark.parametrize("name", CASES)
def test_parity(models, name):
    model = models(name)
    out = model(**load_npz(name))
    for key, want in _outputs(name).items():
        assert_close(out[key], want, name=f"{name}:{key}")
        assert out[key].dtype == jnp.float32


def test_family_detected_from_fields_alone():
    with open(os.path.join(case_dir("cocolm-base-like"), "config.json")) as f:
        hf = json.load(f)
    assert "model_type" not in hf and "architectures" not in hf
    assert lmzoo.detect_family(hf) == "cocolm"


def test_heads_follow_the_keys(models):
    assert models("cocolm-base-like").config.heads == ()
    assert models("cocolm-cls").config.heads == ("classifier",)
    assert models("cocolm-qa").config.heads == ("qa",)
    heads = models("cocolm-heads")
    assert heads.config.heads == ("binary", "clm") and heads.config.need_pooler and not heads.config.tie_clm_head
    out = models("cocolm-base-like")(**load_npz("cocolm-base-like"))
    assert set(out.keys()) == {"last_hidden_state"} and "logits" not in out


def test_dict_style_access(models):
    out = models("cocolm-qa")(**load_npz("cocolm-qa"))
    np.testing.assert_array_equal(out["start_logits"], out.start_logits)
    with pytest.raises(KeyError):
        out["logits"]


# ----------------------------------------------------------------------------------------------------
# relative buckets
def _unsigned(n, bins, max_rel):
    return int(relative_position_bucket(np.array([n]), bins, max_rel)[0])


def test_bucket_base_worked_values():
    """Spec table for base (64 bins, max distance 128): |rel| ranges of buckets 17..31."""
    first = {17: 17, 18: 19, 19: 22, 20: 25, 21: 28, 22: 32, 23: 37, 24: 43, 25: 49, 26: 56, 27: 64, 28: 74, 29: 84, 30: 97, 31: 111}
    for n in range(17):
        assert _unsigned(n, 64, 128) == n
    for b, lo in first.items():
        assert _unsigned(lo, 64, 128) == b, (b, lo)
        assert _unsigned(lo - 1, 64, 128) == b - 1, (b, lo - 1)
    assert _unsigned(511, 64, 128) == 31
    assert _unsigned(-40, 64, 128) == -23  # sign-symmetric


def test_bucket_large_worked_values():
    """Spec for large (128 bins, 256): b = |rel| up to 32, then the first |rel| of buckets 33..63."""
    firsts = [33, 35, 37, 40, 42, 45, 48, 52, 55, 59, 63, 67, 72, 77, 82, 88, 94, 100, 107, 115, 123, 131, 140, 150, 160, 171, 183, 196, 209, 224, 239]
    for n in range(33):
        assert _unsigned(n, 128, 256) == n
    for b, lo in zip(range(33, 64), firsts):
        assert _unsigned(lo, 128, 256) == b and _unsigned(lo - 1, 128, 256) == b - 1, (b, lo)


def test_bucket_table_offsets_and_rows():
    base = relative_position_bucket_table(512, 64, 128)
    assert base.shape == (512, 512) and base.min() == 0 and base.max() == 62  # row 63 never used
    assert base[0, 0] == 31 and base[0, 1] == 32 and base[1, 0] == 30
    large = relative_position_bucket_table(512, 128, 256)
    assert large.max() == 126 and large[0, 0] == 63
    # the offset is taken over the full max_position_embeddings^2 table, not over a T x T slice
    short = relative_position_bucket_table(64, 64, 128)
    assert short[0, 0] == 26 and short.min() == 0


@pytest.mark.parametrize("name", CASES)
def test_bucket_offset_matches_case(name):
    with open(os.path.join(case_dir(name), "config.json")) as f:
        hf = json.load(f)
    with open(os.path.join(case_dir(name), "case.json")) as f:
        want = json.load(f)["bucket_offset"]
    table = relative_position_bucket_table(hf["max_position_embeddings"], hf["rel_pos_bins"], hf["max_rel_pos"])
    assert table[0, 0] == want


@pytest.mark.parametrize("bins,max_rel,max_pos", [(64, 128, 512), (128, 256, 512), (32, 128, 300), (16, 32, 100), (32, 64, 64)])
def test_bucket_table_matches_torch_formula(bins, max_rel, max_pos):
    """The original's torch arithmetic (float32 log, double constant, ceil), evaluated by torch."""
    torch = require("torch")
    pos = torch.arange(max_pos, dtype=torch.long)
    rel = pos[None, :] - pos[:, None]
    sign = torch.sign(rel)
    nb = bins // 2
    n = torch.abs(rel)
    me = nb // 2
    large = me + torch.ceil(torch.log(n.float() / me) / math.log((max_rel - 1) / me) * (nb - 1 - me)).long()
    large = torch.min(large, torch.full_like(large, nb - 1))
    want = torch.where(n < me, n, large) * sign
    want = (want - want.min()).numpy()
    np.testing.assert_array_equal(relative_position_bucket_table(max_pos, bins, max_rel), want)


# ----------------------------------------------------------------------------------------------------
# checkpoint forms
def test_fp16_checkpoint_is_upcast(models, tmp_path):
    """The hub files are fp16 (torch HalfStorage): params come back float32, equal to the rounded values,
    and the forward equals the float32 forward of those rounded weights."""
    torch = require("torch")
    name = "cocolm-heads"
    arrays = _read_arrays(case_dir(name))
    folder = tmp_path / "fp16"
    folder.mkdir()
    torch.save({k: torch.from_numpy(a).half() for k, a in arrays.items()}, folder / "pytorch_model.bin")
    with open(os.path.join(case_dir(name), "config.json")) as f:
        (folder / "config.json").write_text(f.read())
    m16 = lmzoo.from_pretrained(str(folder))
    ref = models(name)
    flat16, flat32 = flatten_tree(m16.params), flatten_tree(ref.params)
    assert all(v.dtype == jnp.float32 for v in flat16.values())
    for path, v in flat32.items():
        np.testing.assert_array_equal(np.asarray(flat16[path]), np.asarray(v).astype(np.float16).astype(np.float32), err_msg=str(path))
    inputs = load_npz(name)
    out16 = m16(**inputs)
    # the same compiled forward on the float32 weights rounded through fp16 here
    m16.params = jax.tree.map(lambda v: jnp.asarray(np.asarray(v).astype(np.float16).astype(np.float32)), ref.params)
    rounded = m16(**inputs)
    for key in _outputs(name):
        np.testing.assert_array_equal(np.asarray(out16[key]), np.asarray(rounded[key]), err_msg=key)
        assert np.isfinite(np.asarray(out16[key])).all()


def test_prefixed_keys_and_unknown_extras_on_a_base_model(models, tmp_path):
    """cocolm.-prefixed keys load into the base model too; keys it does not use are dropped and listed."""
    name = "cocolm-base-like"
    arrays = {"cocolm." + k: a for k, a in _read_arrays(case_dir(name)).items()}
    rng = np.random.default_rng(0)
    extras = {"lm_head.dense.weight": rng.normal(size=(64, 64)).astype(np.float32), "lm_head.bias": np.zeros(200, np.float32)}
    folder = _copy_case(name, tmp_path, {**arrays, **extras})
    model = lmzoo.from_pretrained(folder)
    assert sorted(model.load_report["dropped"]) == sorted(extras)
    assert_close(model(**load_npz(name)).last_hidden_state, _outputs(name)["last_hidden_state"], name="prefixed")


def test_bare_keys_on_a_head_model(tmp_path):
    name = "cocolm-cls"
    arrays = {k.removeprefix("cocolm."): a for k, a in _read_arrays(case_dir(name)).items()}
    assert "embeddings.word_embeddings.weight" in arrays
    folder = _copy_case(name, tmp_path, arrays)
    model = lmzoo.from_pretrained(folder)
    assert model.load_report["dropped"] == []
    assert_close(model(**load_npz(name)).logits, _outputs(name)["logits"], name="bare")
    # the streaming converter matches keys through the same key map and writes the original (prefixed) names
    from lmzoo.convert.convert import convert_checkpoint

    convert_checkpoint(folder, str(tmp_path / "converted"))
    assert set(open_checkpoint(str(tmp_path / "converted")).keys()) == set(open_checkpoint(case_dir(name)).keys())


def test_missing_head_key_is_named(tmp_path):
    name = "cocolm-cls"
    arrays = _read_arrays(case_dir(name))
    del arrays["classifier.out_proj.bias"]
    with pytest.raises(ConversionError, match="classifier.out_proj.bias"):
        lmzoo.from_pretrained(_copy_case(name, tmp_path, arrays))


def test_config_that_does_not_match_the_weights(tmp_path):
    name = "cocolm-base-like"
    arrays = _read_arrays(case_dir(name))
    with pytest.raises(ConversionError, match="num_hidden_layers"):
        lmzoo.from_pretrained(_copy_case(name, tmp_path / "a", arrays, {"num_hidden_layers": 1}))
    with pytest.raises(ConversionError, match="shape"):
        lmzoo.from_pretrained(_copy_case(name, tmp_path / "b", arrays, {"num_attention_heads": 8, "rel_pos_bins": 64}))


@pytest.mark.parametrize("name,fmt", [("cocolm-heads", "pytorch"), ("cocolm-cls", "safetensors"), ("cocolm-qa", "orbax")])
def test_export_round_trip(models, tmp_path, name, fmt):
    model = models(name)
    out_dir = model.save_pretrained(tmp_path / name, format=fmt)
    if fmt == "pytorch":  # the original key names, aliases included
        assert set(open_checkpoint(out_dir).keys()) == set(open_checkpoint(case_dir(name)).keys())
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = json.load(f)
    for key in ("rel_pos_bins", "max_rel_pos", "layer_norm_type", "layer_norm_eps", "hidden_size"):
        assert cfg[key] == model.config.to_hf_config()[key]
    back = lmzoo.from_pretrained(out_dir)
    assert back.config.heads == model.config.heads and back.config.need_pooler == model.config.need_pooler
    got = back(**load_npz(name))
    for key, want in _outputs(name).items():
        assert_close(got[key], want, name=f"{fmt}:{key}")


# ----------------------------------------------------------------------------------------------------
# fairseq checkpoints
_LAYER = {
    "attention.self_attn.in_proj": "self_attn.in_proj",
    "attention.self_attn.out_proj": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "output.LayerNorm": "final_layer_norm",
}


def _to_fairseq(arrays: dict, stack="encoder") -> dict:
    out = {}
    for k, a in arrays.items():
        k = k.removeprefix("cocolm.")
        if k.startswith("encoder.layer."):
            _, _, i, rest = k.split(".", 3)
            mod, leaf = rest.rsplit(".", 1)
            out[f"{stack}.sentence_encoder.layers.{i}.{_LAYER[mod]}.{leaf}"] = a
        elif k == "relative_attention_bias.weight":
            out[f"{stack}.sentence_encoder.relative_attention_bias.weight"] = a
        elif k.startswith("embeddings.") and stack == "encoder":
            sub = {"word_embeddings.weight": "embed_tokens.weight", "position_embeddings.weight": "embed_positions.weight",
                   "LayerNorm.weight": "emb_layer_norm.weight", "LayerNorm.bias": "emb_layer_norm.bias"}[k[len("embeddings."):]]
            out[f"encoder.sentence_encoder.{sub}"] = a
        elif k.startswith("classifier."):
            out["classification_heads.mnli." + k[len("classifier."):]] = a
    return out


@pytest.fixture(scope="module")
def fairseq_model(tmp_path_factory):
    """cocolm-cls rewritten as a fairseq pretraining+fine-tune checkpoint: every pretraining head, a
    generator whose layers are copies of the main ones, tied copies, and the classifier (GELU args)."""
    torch = require("torch")
    arrays = _read_arrays(case_dir("cocolm-cls"))
    rng = np.random.default_rng(1)
    V, H = arrays["cocolm.embeddings.word_embeddings.weight"].shape
    sd = _to_fairseq(arrays)
    sd.update(_to_fairseq(arrays, stack="auxiliary"))
    emb = sd["encoder.sentence_encoder.embed_tokens.weight"]
    extra = {
        "encoder.binary_head.out_proj.weight": rng.normal(0, 0.2, (1, H)),
        "encoder.binary_head.out_proj.bias": rng.normal(0, 0.2, (1,)),
        "encoder.lm_head.weight": emb,
        "encoder.lm_head.bias": rng.normal(0, 0.2, (V,)),
        "encoder.seq_head.dense.weight": rng.normal(0, 0.2, (H, H)),
        "encoder.seq_head.dense.bias": rng.normal(0, 0.2, (H,)),
        "encoder.seq_head.layer_norm.weight": 1 + rng.normal(0, 0.2, (H,)),
        "encoder.seq_head.layer_norm.bias": rng.normal(0, 0.2, (H,)),
        "auxiliary.sentence_encoder.embed_tokens.weight": emb,
        "auxiliary.sentence_encoder.embed_positions.weight": sd["encoder.sentence_encoder.embed_positions.weight"],
        "auxiliary.lm_head.weight": emb,
        "auxiliary.lm_head.dense.weight": rng.normal(0, 0.2, (H, H)),
        "auxiliary.lm_head.dense.bias": rng.normal(0, 0.2, (H,)),
        "auxiliary.lm_head.layer_norm.weight": 1 + rng.normal(0, 0.2, (H,)),
        "auxiliary.lm_head.layer_norm.bias": rng.normal(0, 0.2, (H,)),
        "auxiliary.lm_head.bias": rng.normal(0, 0.2, (V,)),
    }
    sd.update({k: np.asarray(v, np.float32) for k, v in extra.items()})
    args = argparse.Namespace(encoder_attention_heads=4, max_rel_pos=64, rel_pos_bins=32, activation_fn="gelu",
                              pooler_activation_fn="gelu", generator_sample_mode="eval", dropout=0.1, attention_dropout=0.1)
    path = tmp_path_factory.mktemp("fairseq") / "model.pt"
    torch.save({"args": args, "model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}}, path)
    from lmzoo.convert.cocolm import load_fairseq

    return load_fairseq(path), sd, path


def test_fairseq_checkpoint(fairseq_model):
    model, sd, _ = fairseq_model
    c = model.config
    assert c.heads == ("classifier", "binary", "clm", "generator") and c.tie_clm_head and c.need_pooler
    assert c.generator_layers == 2 and c.classifier_activation == "gelu" and c.num_labels == 3
    assert sorted(model.load_report["dropped"]) == sorted(
        ["encoder.lm_head.weight", "auxiliary.lm_head.weight", "auxiliary.sentence_encoder.embed_tokens.weight",
         "auxiliary.sentence_encoder.embed_positions.weight"]
    )
    inputs = load_npz("cocolm-cls")
    out = model(**inputs)
    assert_close(out.logits, _outputs("cocolm-cls")["logits"], name="fairseq logits")
    h = np.asarray(out.last_hidden_state, np.float64)
    want_clm = h @ sd["encoder.sentence_encoder.embed_tokens.weight"].T.astype(np.float64) + sd["encoder.lm_head.bias"]
    assert_close(out.clm_logits, want_clm, name="tied clm_logits")
    want_bin = h @ sd["encoder.binary_head.out_proj.weight"][0] + sd["encoder.binary_head.out_proj.bias"][0]
    assert_close(out.binary_logits, want_bin, name="binary_logits")

    # The generator's layers and relative table are copies of the main ones here, so its hidden state is
    # the main one and its logits are the MLM transform of it through the shared (tied) embedding.
    gen = model.module.apply({"params": model.params}, **{k: jnp.asarray(v) for k, v in inputs.items()}, method=CocoLMModule.generator_logits)
    x = h @ sd["auxiliary.lm_head.dense.weight"].T.astype(np.float64) + sd["auxiliary.lm_head.dense.bias"]
    x = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    x = x * sd["auxiliary.lm_head.layer_norm.weight"] + sd["auxiliary.lm_head.layer_norm.bias"]
    want_gen = x @ sd["encoder.sentence_encoder.embed_tokens.weight"].T.astype(np.float64) + sd["auxiliary.lm_head.bias"]
    assert_close(gen, want_gen, name="generator_logits")


def test_fairseq_convert_to_hf_folder(fairseq_model, tmp_path):
    from lmzoo.convert.cocolm import convert_fairseq

    model, _, path = fairseq_model
    out = convert_fairseq(path, tmp_path / "hf", format="pytorch")
    keys = set(open_checkpoint(out).keys())
    assert "cocolm.encoder.layer.0.attention.self_attn.in_proj.weight" in keys and "classifier.out_proj.weight" in keys
    assert "generator.encoder.layer.1.output.LayerNorm.bias" in keys and "clm_head.decoder.weight" not in keys
    back = lmzoo.from_pretrained(out)
    assert back.config.heads == model.config.heads and back.config.tie_clm_head
    inputs = load_npz("cocolm-cls")
    a, b = model(**inputs), back(**inputs)
    for key in ("logits", "clm_logits", "binary_logits", "pooled_output"):
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_fairseq_classifier_defaults_to_tanh(tmp_path):
    torch = require("torch")
    from lmzoo.convert.cocolm import load_fairseq

    arrays = _to_fairseq(_read_arrays(case_dir("cocolm-cls")))
    path = tmp_path / "model.pt"
    torch.save({"args": argparse.Namespace(encoder_attention_heads=4, max_rel_pos=64),
                "model": {k: torch.from_numpy(v) for k, v in arrays.items()}}, path)
    model = load_fairseq(path)
    assert model.config.classifier_activation == "tanh" and model.config.heads == ("classifier",)
    torch.save({"args": None, "model": {k: torch.from_numpy(v) for k, v in arrays.items()}}, path)
    with pytest.raises(ConversionError, match="max_rel_pos"):
        load_fairseq(path)
    arrays.update({k.replace(".mnli.", ".other."): v for k, v in arrays.items() if k.startswith("classification_heads.")})
    torch.save({"args": argparse.Namespace(encoder_attention_heads=4, max_rel_pos=64),
                "model": {k: torch.from_numpy(v) for k, v in arrays.items()}}, path)
    with pytest.raises(ConversionError, match="several classification heads"):
        load_fairseq(path)
    assert load_fairseq(path, head="other").config.heads == ("classifier",)


# ----------------------------------------------------------------------------------------------------
# training-facing behaviour
def test_all_padding_row_has_finite_gradients(models):
    """The original zeroes NaNs of an all-masked row after out_proj; here no NaN is ever formed, so the
    gradient of a loss over a batch holding such a row stays finite."""
    model = models("cocolm-heads")
    inputs = {k: jnp.asarray(v) for k, v in load_npz("cocolm-heads").items()}
    assert not np.asarray(inputs["attention_mask"][2]).any()

    def loss(params):
        out = model.module.apply({"params": params}, **inputs, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
        return sum(jnp.sum(jnp.square(v)) for v in out.values())

    grads = jax.jit(jax.grad(loss))(model.params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_every_param_has_logical_axes(fairseq_model):
    model, _, _ = fairseq_model
    specs = flatten_tree(model.logical_specs())
    shapes = flatten_tree(model.abstract_params())
    assert set(specs) == set(shapes)
    for path, spec in specs.items():
        assert len(spec) == len(shapes[path].shape), path
        assert any(name is not None for name in spec), path


def test_labels_give_the_original_losses(models):
    inputs = load_npz("cocolm-cls")
    model = models("cocolm-cls")
    out = model(**inputs, labels=np.array([0, 2, 1]))
    logits = np.asarray(out.logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(float(out.loss), -np.mean(logp[[0, 1, 2], [0, 2, 1]]), rtol=1e-5)
    qa = models("cocolm-qa")
    out = qa(**load_npz("cocolm-qa"), start_positions=np.array([3, 5]), end_positions=np.array([4, 9]))
    s, e = (np.asarray(x, np.float64) for x in (out.start_logits, out.end_logits))
    nll = lambda x, t: -(x[np.arange(2), t] - np.log(np.exp(x).sum(-1)))  # noqa: E731
    np.testing.assert_allclose(float(out.loss), 0.5 * (nll(s, [3, 5]).sum() + nll(e, [4, 9]).sum()), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# bad input
def test_bad_config_values():
    with pytest.raises(ConfigError, match="rel_pos_bins"):
        CocoLMConfig(rel_pos_bins=33)
    with pytest.raises(ConfigError, match="divisible"):
        CocoLMConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ConfigError, match="layer_norm_type"):
        CocoLMConfig(layer_norm_type="sandwich")
    with pytest.raises(ConfigError, match="heads"):
        CocoLMConfig(heads=("lm",))


def test_too_long_input_is_refused(models):
    model = models("cocolm-base-like")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=np.zeros((1, 65), np.int64))


def test_sharded_forward_equals_the_case():
    """On a (data 2, fsdp 2, tensor 2) mesh of simulated devices: params split by their logical axes
    (heads over tensor, embed over fsdp), and the forward still matches the original."""
    from lmzoo.sharding import make_mesh

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = lmzoo.from_pretrained(case_dir("cocolm-heads"), mesh=mesh)
    spec = model.params["encoder"]["layer_0"]["self_attn"]["in_proj"]["kernel"].sharding.spec
    assert tuple(spec) == ("fsdp", None, "tensor", None)
    inputs = {k: v[:2] for k, v in load_npz("cocolm-heads").items()}
    out = model(**inputs)
    for key, want in _outputs("cocolm-heads").items():
        assert_close(out[key], want[:2], name=f"sharded:{key}")


def test_bad_ids_are_refused(models):
    model = models("cocolm-base-like")
    with pytest.raises(ValueError, match="input_ids holds 200"):
        model(input_ids=np.array([[0, 5, 200]]))
    with pytest.raises(ValueError, match="position_ids holds -1"):
        model(input_ids=np.array([[0, 5, 2]]), position_ids=np.array([[0, 1, -1]]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=np.array([[0, 5, 2]]), attention_mask=np.ones((1, 4), np.int64))


def test_fresh_model_with_every_head_round_trips(tmp_path):
    """A model built from a config (as pretraining does) has a param for every key it exports."""
    config = CocoLMConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          max_position_embeddings=16, rel_pos_bins=8, max_rel_pos=16, need_pooler=True,
                          heads=("classifier", "qa", "binary", "clm", "generator"), generator_layers=1, num_labels=3)
    model = lmzoo.cocolm.CocoLMModel(config, seed=3)
    back = lmzoo.from_pretrained(model.save_pretrained(tmp_path / "fresh", format="pytorch"))
    assert back.config.heads == config.heads and back.config.tie_clm_head and back.config.generator_layers == 1
    flat, flat_back = flatten_tree(model.params), flatten_tree(back.params)
    assert set(flat) == set(flat_back)
    for path, v in flat.items():
        np.testing.assert_array_equal(np.asarray(flat_back[path]), np.asarray(v), err_msg=str(path))
