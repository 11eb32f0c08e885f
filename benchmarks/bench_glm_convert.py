"""Convert a synthetic glm-10b-shaped fp16 ``pytorch_model.bin`` to safetensors: peak RSS and GB/s.

The real glm-10b-chinese is one 19.8 GB fp16 pickle. This script writes a file with the same tensor names,
shapes and dtype (random data; ``--layers`` keeps a slice of the 48 layers when disk is short), then runs
``lmzoo.convert.glm.convert_glm_checkpoint`` in a fresh process and reports that process's peak RSS
(target: <= 2 GB, i.e. bounded by the largest tensor, not the model) and throughput. The output stays fp16.

    python benchmarks/bench_glm_convert.py --workdir /big/disk [--layers 48] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

GLM_10B = {
    "architectures": ["GLMModel"], "model_type": "glm", "num_layers": 48, "hidden_size": 4096, "num_attention_heads": 64,
    "max_sequence_length": 1024, "vocab_size": 50048, "attention_scale": 1.0, "block_position_encoding": True,
    "output_predict": True, "bad_words_id": [50009], "torch_dtype": "float32",
}


def write_synthetic(folder: str, layers: int) -> int:
    from lmzoo.convert.writers import ExportTensor, write_torch_zip

    H, V, P = GLM_10B["hidden_size"], GLM_10B["vocab_size"], GLM_10B["max_sequence_length"] + 1
    shapes = {"word_embeddings.weight": (V, H), "transformer.position_embeddings.weight": (P, H),
              "transformer.block_position_embeddings.weight": (P, H)}
    for i in range(layers):
        k = f"transformer.layers.{i}"
        shapes.update({
            f"{k}.input_layernorm.weight": (H,), f"{k}.input_layernorm.bias": (H,),
            f"{k}.attention.query_key_value.weight": (3 * H, H), f"{k}.attention.query_key_value.bias": (3 * H,),
            f"{k}.attention.dense.weight": (H, H), f"{k}.attention.dense.bias": (H,),
            f"{k}.post_attention_layernorm.weight": (H,), f"{k}.post_attention_layernorm.bias": (H,),
            f"{k}.mlp.dense_h_to_4h.weight": (4 * H, H), f"{k}.mlp.dense_h_to_4h.bias": (4 * H,),
            f"{k}.mlp.dense_4h_to_h.weight": (H, 4 * H), f"{k}.mlp.dense_4h_to_h.bias": (H,),
        })
    shapes["transformer.final_layernorm.weight"] = (H,)
    shapes["transformer.final_layernorm.bias"] = (H,)
    rng = np.random.default_rng(0)
    block = rng.standard_normal(1 << 20).astype(np.float16)  # tile a random block: fast to make, not all zeros

    def make(shape):
        n = int(np.prod(shape))
        return lambda: np.resize(block, n).reshape(shape)

    tensors = {k: ExportTensor(s, np.float16, make(s)) for k, s in shapes.items()}
    os.makedirs(folder, exist_ok=True)
    write_torch_zip(os.path.join(folder, "pytorch_model.bin"), tensors)
    cfg = dict(GLM_10B, num_layers=layers)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return sum(t.nbytes for t in tensors.values())


CHILD = r"""
import json, resource, sys, time
from lmzoo.convert.glm import convert_glm_checkpoint
src, dst = sys.argv[1], sys.argv[2]
cfg = json.load(open(src + "/config.json"))
t = time.perf_counter()
convert_glm_checkpoint(src, dst, cfg, format="safetensors", copy_rows={50009: 50007})
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lmzoo-glm-bench"),
                    help="where the synthetic pickle and the output go")
    ap.add_argument("--layers", type=int, default=48, help="layers to keep (48 = the full 10B shape, ~19.8 GB)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    args = ap.parse_args(argv)
    src = os.path.join(args.workdir, "src")
    dst = os.path.join(args.workdir, "dst")
    shutil.rmtree(args.workdir, ignore_errors=True)
    t = time.perf_counter()
    nbytes = write_synthetic(src, args.layers)
    print(f"wrote synthetic glm-10b-shaped fp16 pickle: {args.layers}/48 layers, {nbytes / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s")
    out = subprocess.run([sys.executable, "-c", CHILD, src, dst], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    size = os.path.getsize(os.path.join(dst, "model.safetensors"))
    print(f"converted to safetensors (fp16, {size / 1e9:.2f} GB): {r['seconds']:.1f} s, {nbytes / 1e9 / r['seconds']:.2f} GB/s, "
          f"peak RSS {r['peak_rss_kb'] / 2**20:.2f} GiB (target <= 2 GB)")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
