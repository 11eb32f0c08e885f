"""The T5 forward jit-compiled over 8 simulated CPU devices with params sharded by the logical rules."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

import lmzoo
from lmzoo.sharding import make_mesh

from .parity import assert_close, case_dir, load_npz


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py must set 8 simulated CPU devices before jax is imported"
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_make_mesh_validates_shapes():
    with pytest.raises(ValueError, match="needs 12 devices"):
        make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 8})
    assert make_mesh({"fsdp": -1, "tensor": 2}).shape == {"data": 1, "fsdp": 4, "tensor": 2}


def test_sharded_t5_forward_equals_single_device(mesh):
    name = "longlm-tiny"
    inputs = load_npz(name)
    single = lmzoo.from_pretrained(case_dir(name))
    sharded = lmzoo.from_pretrained(case_dir(name), mesh=mesh)

    # params really are split: per-device shards smaller than the global arrays
    q = sharded.params["encoder"]["block_0"]["self_attn"]["q"]["kernel"]
    assert isinstance(q.sharding, NamedSharding)
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    shard_shape = q.addressable_shards[0].data.shape
    assert shard_shape == (q.shape[0] // 2, q.shape[1] // 2)
    emb = sharded.params["shared"]["embedding"]
    assert emb.addressable_shards[0].data.shape == (emb.shape[0] // 2, emb.shape[1] // 2)
    n_split = sum(
        1 for p in jax.tree.leaves(sharded.params) if p.addressable_shards[0].data.size < p.size
    )
    assert n_split >= 30

    want = single(**inputs)
    got = sharded(**inputs)
    # sharded contractions sum in another order: equal within the parity rule, not bitwise
    assert_close(got.logits, np.asarray(want.logits), name="logits")
    assert_close(got.encoder_last_hidden_state, np.asarray(want.encoder_last_hidden_state), name="encoder")
    # and against the original's stored outputs
    for key, ref in load_npz(name, "outputs.npz").items():
        assert_close(got[key], ref, name=key)


def test_sharded_program_has_collectives(mesh):
    model = lmzoo.from_pretrained(case_dir("longlm-tiny"), mesh=mesh)
    inputs = {k: jax.numpy.asarray(v) for k, v in load_npz("longlm-tiny").items()}

    def fwd(params, batch):
        from flax import linen as nn

        from lmzoo.sharding import LOGICAL_RULES

        with nn.logical_axis_rules(LOGICAL_RULES):
            return model.forward(params, **batch).logits

    with jax.set_mesh(mesh):
        hlo = jax.jit(fwd).lower(model.params, inputs).compile().as_text()
    assert any(op in hlo for op in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all"))
