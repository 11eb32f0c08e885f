"""Checkpoint readers and the converter: safety, formats, clear errors, atomic output, bounded memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import ml_dtypes
import numpy as np
import pytest

import lmzoo
from lmzoo.convert.checkpoint import open_checkpoint
from lmzoo.convert.cli import main as convert_main
from lmzoo.convert.keymap import ConversionError
from lmzoo.convert.torch_pickle import CheckpointError, UnsafePickleError, read_torch_zip
from lmzoo.convert.writers import ExportTensor, write_torch_zip

from .conftest import require
from .parity import case_dir

TINY = case_dir("longlm-tiny")


def _zip_with_pickle(path, pkl: bytes):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/version", b"3\n")


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("subprocess", "call"), ("posix", "system")])
def test_code_running_pickle_is_refused_and_nothing_runs(tmp_path, module, name):
    marker = tmp_path / "pwned"
    payload = f"touch {marker}" if name in ("system", "call") else f"open({str(marker)!r}, 'w')"
    if name == "call":
        pkl = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"(X" + len(payload).to_bytes(4, "little") + payload.encode() + b"\x85R."
    else:
        pkl = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + len(payload).to_bytes(4, "little") + payload.encode() + b"\x85R."
    bad = tmp_path / "pytorch_model.bin"
    _zip_with_pickle(bad, pkl)
    with pytest.raises(UnsafePickleError, match=f"{module}.{name}"):
        read_torch_zip(bad)
    assert not marker.exists()
    # and through the CLI: an error, no output folder
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(os.path.join(TINY, "config.json"), src)
    shutil.copy(bad, src / "pytorch_model.bin")
    assert convert_main([str(src), str(tmp_path / "out"), "-q"]) == 1
    assert not (tmp_path / "out").exists()
    assert not marker.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".lmzoo")]


def test_arbitrary_class_is_refused(tmp_path):
    bad = tmp_path / "m.bin"
    _zip_with_pickle(bad, b"\x80\x02c" + b"collections\nCounter\n" + b")R.")
    with pytest.raises(UnsafePickleError, match="collections.Counter"):
        read_torch_zip(bad)


def _folder(tmp_path, name="src", weights=None, config=None):
    d = tmp_path / name
    d.mkdir()
    cfg = json.load(open(os.path.join(TINY, "config.json")))
    cfg.update(config or {})
    json.dump(cfg, open(d / "config.json", "w"))
    if weights is not None:
        shutil.copy(weights, d / "pytorch_model.bin")
    return d


def _truncate(src, dst, frac):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[: int(len(data) * frac)])


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.97])
def test_truncated_file_gives_clear_error_and_no_output(tmp_path, frac, capsys):
    src = _folder(tmp_path)
    _truncate(os.path.join(TINY, "pytorch_model.bin"), src / "pytorch_model.bin", frac)
    with pytest.raises(CheckpointError):
        lmzoo.from_pretrained(str(src))
    assert convert_main([str(src), str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and ("truncated" in err or "corrupt" in err)
    assert not (tmp_path / "out").exists()


def test_corrupted_pickle_gives_clear_error(tmp_path):
    src = _folder(tmp_path)
    raw = bytearray(open(os.path.join(TINY, "pytorch_model.bin"), "rb").read())
    with zipfile.ZipFile(os.path.join(TINY, "pytorch_model.bin")) as zf:
        info = zf.getinfo("pytorch_model/data.pkl")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + 2 : start + 40] = b"\xff" * 38  # garble the pickle stream (CRC is not checked by mmap readers)
    open(src / "pytorch_model.bin", "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt|pickle|CRC"):
        open_checkpoint(str(src))


def test_legacy_torch_file_is_refused_clearly(tmp_path):
    torch = require("torch")
    p = tmp_path / "legacy.bin"
    torch.save({"w": torch.zeros(3)}, p, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        read_torch_zip(p)


def test_wrong_family_checkpoint_names_keys_and_writes_nothing(tmp_path, capsys):
    src = _folder(tmp_path, weights=os.path.join(case_dir("bart-tiny"), "pytorch_model.bin"))
    with pytest.raises(ConversionError, match="not look like a t5 checkpoint.*missing keys: .*SelfAttention.*unexpected keys: .*model.shared.weight"):
        lmzoo.from_pretrained(str(src))
    assert convert_main([str(src), str(tmp_path / "out"), "-q"]) == 1
    assert "does not fit the t5 model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_the_key(tmp_path):
    src = _folder(tmp_path, weights=os.path.join(TINY, "pytorch_model.bin"), config={"d_ff": 96})
    with pytest.raises(ConversionError, match=r"DenseReluDense\.wi\.weight: checkpoint shape \(128, 64\)"):
        lmzoo.from_pretrained(str(src))


def test_unknown_family_is_named(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    json.dump({"model_type": "gpt_neox", "hidden_size": 8}, open(d / "config.json", "w"))
    with pytest.raises(lmzoo.ConfigError, match="gpt_neox"):
        lmzoo.from_pretrained(str(d))


def test_reader_matches_torch_for_dtypes_views_and_shared_storage(tmp_path):
    torch = require("torch")
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    sd = {
        "f32": base,
        "transposed": base.t(),  # a strided view of the same storage
        "offset_view": base[2:],  # storage offset
        "column": base[:, 3],
        "f16": torch.randn(4, 5).half(),
        "bf16": torch.randn(7).bfloat16(),
        "i64": torch.arange(-5, 5),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    p = tmp_path / "m.bin"
    torch.save(sd, p)
    got = open_checkpoint(str(p))
    assert got["f32"].storage_key == got["transposed"].storage_key  # shared storage recognised
    for k, v in sd.items():
        want = v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy()
        a = got[k].numpy()
        assert a.dtype == want.dtype and a.shape == want.shape, k
        np.testing.assert_array_equal(a, want, err_msg=k)


def test_safetensors_and_sharded_index_load_the_same_model(tmp_path):
    torch = require("torch")
    st = require("safetensors.torch")
    ref = lmzoo.from_pretrained(TINY)
    sd = {k: v.contiguous() for k, v in torch.load(os.path.join(TINY, "pytorch_model.bin")).items()}
    one = _folder(tmp_path, "one")
    st.save_file({"shared.weight": sd["shared.weight"], **{k: v for k, v in sd.items() if "embed_tokens" not in k and k not in ("shared.weight", "lm_head.weight")}}, one / "model.safetensors")
    sharded = _folder(tmp_path, "sharded")
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k].clone() for k in part}, sharded / name)
        weight_map.update({k: name for k in part})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(sharded / "pytorch_model.bin.index.json", "w"))
    for folder in (one, sharded):
        m = lmzoo.from_pretrained(str(folder))
        for a, b in zip(jax_leaves(m.params), jax_leaves(ref.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_fp16_checkpoint_is_upcast_and_dtype_flag_converts(tmp_path):
    fp16 = tmp_path / "fp16"
    assert convert_main([TINY, str(fp16), "--dtype", "float16", "-q", "--format", "pytorch"]) == 0
    sd = open_checkpoint(str(fp16))
    assert {t.dtype for t in sd.values()} == {np.dtype(np.float16)}
    m = lmzoo.from_pretrained(str(fp16))
    assert all(np.asarray(p).dtype == np.float32 for p in jax_leaves(m.params))  # upcast, float32 compute
    ref = lmzoo.from_pretrained(TINY)
    for a, b in zip(jax_leaves(m.params), jax_leaves(ref.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(np.float16).astype(np.float32))
    # converting again without --dtype keeps fp16 (copies bytes, no cast)
    again = tmp_path / "again"
    assert convert_main([str(fp16), str(again), "-q"]) == 0
    assert {t.dtype for t in open_checkpoint(str(again)).values()} == {np.dtype(np.float16)}


def test_existing_output_is_not_clobbered(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert_main([TINY, str(out), "-q"]) == 1
    assert (out / "keep.txt").read_text() == "mine"


def test_torch_zip_writer_output_loads_with_torch_weights_only(tmp_path):
    torch = require("torch")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensors = {
        "a": ExportTensor(a.shape, a.dtype, lambda: a),
        "tied": ExportTensor(a.shape, a.dtype, lambda: a, alias_of="a"),
        "h": ExportTensor((2,), np.float16, lambda: np.array([1.5, -2], np.float16)),
        "i": ExportTensor((3,), np.int64, lambda: np.array([1, 2, 3])),
    }
    p = tmp_path / "w.bin"
    write_torch_zip(str(p), tensors)
    sd = torch.load(p, weights_only=True)
    np.testing.assert_array_equal(sd["a"].numpy(), a)
    assert sd["a"].data_ptr() == sd["tied"].data_ptr()  # one storage
    assert sd["h"].dtype == torch.float16 and sd["i"].dtype == torch.int64


STREAM_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys
    import numpy as np
    mode, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
    import jax, lmzoo  # the interpreter baseline includes jax and lmzoo
    if mode == "convert":
        from lmzoo.convert.cli import main
        assert main([src, dst, "-q"]) == 0
    elif mode == "load-all":
        from lmzoo.convert.checkpoint import open_checkpoint
        keep = [t.numpy() for t in open_checkpoint(src).values()]
    # VmHWM: this process's own peak (ru_maxrss would include the forking parent's size)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print(json.dumps({"maxrss_kb": int(hwm)}))
    """
)


def _rss(mode, src, dst):
    out = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, mode, str(src), str(dst)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kb"] * 1024


def _synthetic_t5(folder, **sizes):
    """Write a random T5 checkpoint of the given sizes, one tensor at a time (returns largest tensor bytes)."""
    from lmzoo.t5 import T5Config, T5ForConditionalGeneration

    cfg = json.load(open(os.path.join(TINY, "config.json")))
    cfg.update(sizes)
    folder.mkdir()
    json.dump(cfg, open(folder / "config.json", "w"))
    config = T5Config.from_hf_config(cfg)
    model = T5ForConditionalGeneration.bare(config)
    shapes = model.param_shapes()
    keymap = T5ForConditionalGeneration.key_map(config)
    tensors = {}
    for i, (key, p) in enumerate(keymap.params.items()):
        shape = shapes[p.path][::-1] if p.to_torch is not None else shapes[p.path]
        tensors[key] = ExportTensor(shape, np.float32, lambda shape=shape, i=i: np.random.default_rng(i).standard_normal(shape, np.float32))
    for alias, canon in keymap.aliases.items():
        tensors[alias] = ExportTensor(tensors[canon].shape, np.float32, tensors[canon].get, alias_of=canon)
    write_torch_zip(str(folder / "pytorch_model.bin"), tensors)
    return max(t.nbytes for t in tensors.values()), sum(t.nbytes for t in tensors.values() if t.alias_of is None)


def test_conversion_streams_with_bounded_peak_rss(tmp_path):
    """A ~240 MB checkpoint converts with peak RSS near one tensor above the baseline: tensors stream."""
    largest, total = _synthetic_t5(
        tmp_path / "big", vocab_size=4096, d_model=1024, d_ff=4096, num_heads=8, d_kv=128, num_layers=2, num_decoder_layers=2
    )
    assert total > 200e6
    base = _rss("baseline", tmp_path / "big", tmp_path / "none")
    conv = _rss("convert", tmp_path / "big", tmp_path / "out")
    whole = _rss("load-all", tmp_path / "big", tmp_path / "none")
    assert whole - base > 0.8 * total  # a reader that loads everything would fail the bound below
    assert conv - base <= 1.5 * largest + 100e6, (conv - base) / 1e6
    m_src, m_dst = open_checkpoint(str(tmp_path / "big")), open_checkpoint(str(tmp_path / "out"))
    for k in ("shared.weight", "decoder.block.1.layer.2.DenseReluDense.wo.weight"):
        np.testing.assert_array_equal(m_src[k].numpy(), m_dst[k].numpy())


def test_to_lsg_cli_makes_a_long_input_lsg_bart(tmp_path):
    out = tmp_path / "lsg"
    args = [case_dir("bart-tiny"), str(out), "--to-lsg", "--max-length", "512", "--block-size", "16",
            "--num-global-tokens", "4", "--mask-token-id", "199", "-q"]
    assert convert_main(args) == 0
    cfg = json.load(open(out / "config.json"))
    assert cfg["max_position_embeddings"] == 512 and cfg["block_size"] == 16 and cfg["num_global_tokens"] == 4
    assert cfg["architectures"] == ["LSGBartForConditionalGeneration"]
    m = lmzoo.from_pretrained(str(out))
    assert type(m).__name__ == "LSGBartForConditionalGeneration"
    sd = open_checkpoint(str(out))
    table = sd["model.encoder.embed_positions.weight"].numpy()
    src = open_checkpoint(case_dir("bart-tiny"))["model.encoder.embed_positions.weight"].numpy()
    assert table.shape == (514, src.shape[1])
    np.testing.assert_array_equal(table[2 : 2 + 64], src[2:66])  # positions tiled from the learned table
    np.testing.assert_array_equal(table[2 + 64 : 2 + 128], src[2:66])
    ids = np.random.default_rng(0).integers(3, 199, size=(1, 300))
    assert m.generate(ids, num_beams=2, max_length=12, no_repeat_ngram_size=3, early_stopping=True).shape[0] == 1
    assert convert_main(args) == 1  # exists now: refused without --overwrite
