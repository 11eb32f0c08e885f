"""The model wrapper every family shares: params + config + module, forward, generate, save/load.

A family file defines a :class:`PretrainedModel` subclass that supplies the Flax module, the key map,
a dummy input for shape inference and a pure ``forward(params, **kwargs)``; everything else (loading
original checkpoints, placing params on a mesh, jit caching, export in three formats) lives here.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from typing import Any, ClassVar, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .configuration import ConfigError, ModelConfig, read_json
from .sharding import LOGICAL_RULES, param_shardings

__all__ = ["PretrainedModel", "from_pretrained", "detect_family", "FAMILIES", "LMZOO_MARKER"]

LMZOO_MARKER = "lmzoo.json"  # written next to config.json by save_pretrained

# family -> module defining ``model_class(hf_config) -> type[PretrainedModel]``
FAMILIES: dict[str, str] = {
    "t5": "lmzoo.t5",
    "bart": "lmzoo.lsg_bart",
    "lsg_bart": "lmzoo.lsg_bart",
    "glm": "lmzoo.glm",
    "cocolm": "lmzoo.cocolm",
    "palm": "lmzoo.palm",
}
_FAMILY_ALIASES = {"longlm": "t5", "mt5": "t5", "lsg-bart": "lsg_bart", "lsgbart": "lsg_bart", "coco-lm": "cocolm", "palm_v2": "palm"}
_LSG_KEYS = ("block_size", "sparsity_type", "num_global_tokens", "sparse_block_size", "sparsity_factor")
_COCOLM_KEYS = ("rel_pos_bins", "max_rel_pos", "layer_norm_type")


def detect_family(hf: Mapping[str, Any], folder: Optional[str] = None) -> str:
    """Which family a config.json describes: model_type / architectures, else its characteristic fields."""
    model_type = str(hf.get("model_type") or "").lower()
    archs = [str(a) for a in hf.get("architectures") or []]
    if any("LSG" in a for a in archs) or (model_type == "bart" and all(k in hf for k in ("block_size", "sparsity_type"))):
        return "lsg_bart"
    if model_type in FAMILIES:
        return model_type
    if model_type in _FAMILY_ALIASES:
        return _FAMILY_ALIASES[model_type]
    for a in archs:
        for prefix, fam in (("T5", "t5"), ("MT5", "t5"), ("Bart", "bart"), ("GLM", "glm"), ("COCOLM", "cocolm"), ("Palm", "palm")):
            if a.startswith(prefix):
                return fam
    if all(k in hf for k in _COCOLM_KEYS):
        return "cocolm"
    if folder and os.path.exists(os.path.join(folder, "configuration.json")) and "encoder_pth" in hf:
        return "palm"
    if all(k in hf for k in ("d_kv", "num_heads", "relative_attention_num_buckets")):
        return "t5"
    where = f" in {folder}" if folder else ""
    raise ConfigError(
        f"cannot tell which model family the config{where} describes (model_type={hf.get('model_type')!r}, "
        f"architectures={archs}); lmzoo knows: {', '.join(sorted(FAMILIES))}"
    )


def model_class_for(family: str, hf: Mapping[str, Any]) -> type["PretrainedModel"]:
    family = _FAMILY_ALIASES.get(family, family)
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; lmzoo knows: {', '.join(sorted(FAMILIES))}")
    try:
        mod = importlib.import_module(FAMILIES[family])
    except ModuleNotFoundError as e:
        if e.name == FAMILIES[family]:
            raise ConfigError(f"model family {family!r} is not implemented in this version of lmzoo") from None
        raise
    return mod.model_class(hf)


def _to_array(x):
    if x is None or isinstance(x, jax.Array):
        return x
    if isinstance(x, (np.ndarray, np.generic)):
        return jnp.asarray(x)
    if isinstance(x, (list, tuple)) and x and all(isinstance(e, (np.ndarray, jax.Array)) for e in x):
        return type(x)(jnp.asarray(e) for e in x)
    if isinstance(x, (list, tuple)):
        return jnp.asarray(np.asarray(x))
    if hasattr(x, "numpy") and hasattr(x, "detach"):  # a torch tensor
        return jnp.asarray(x.detach().cpu().numpy())
    return x


def _is_array_like(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) or (
        isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(e, (jax.Array, np.ndarray)) for e in x)
    )


class PretrainedModel:
    """Params + config + module. Subclasses set the class attributes and implement ``forward``."""

    family: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    architecture: ClassVar[str] = ""  # the original class name written to config.json "architectures"
    # CPU decoding with 1 to 32 rows keeps out-major copies of the decoder's matrices (faster steps: ~1.1x
    # with one row, ~1.5x with 8, at the memory of those matrices) when they take at most
    # out_major_decode_max_bytes; False: multiply by the kernels as stored
    out_major_decode_weights: bool = True
    out_major_decode_max_bytes: int = 2 << 30

    def __init__(self, config: ModelConfig, params: Optional[Mapping] = None, *, mesh=None, seed: int = 0):
        self.config = config
        self.mesh = mesh
        self.module = self.make_module(config)
        self._jit_cache: dict = {}
        self._decode_cache: dict = {}
        self._out_major = None  # ({path: kernel}, {path: out-major copy}) for few-row decoding on CPU
        if params is None:
            params = self.init_params(jax.random.PRNGKey(seed))
        self.params = self._place(params)

    # ---- what a family provides -------------------------------------------------------------------
    @classmethod
    def make_module(cls, config: ModelConfig) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def key_map(cls, config: ModelConfig):
        """The :class:`lmzoo.convert.keymap.KeyMap` between original keys and params."""
        raise NotImplementedError

    def dummy_inputs(self) -> dict[str, jax.Array]:
        """Small inputs for ``module.init`` (shape inference only)."""
        raise NotImplementedError

    def forward(self, params, **kwargs):
        """Pure forward with the original's keyword arguments; called under jit."""
        raise NotImplementedError

    def init_call(self, rng, **inputs):
        return self.module.init(rng, **inputs)

    # ---- params -----------------------------------------------------------------------------------
    def _boxed_abstract(self):
        return jax.eval_shape(lambda: self.init_call(jax.random.PRNGKey(0), **self.dummy_inputs()))["params"]

    def abstract_params(self):
        return nn.unbox(self._boxed_abstract())

    def logical_specs(self):
        return nn.get_partition_spec(self._boxed_abstract())

    def param_shapes(self) -> dict[tuple[str, ...], tuple[int, ...]]:
        from lmzoo.convert.keymap import flatten_tree

        return {k: tuple(v.shape) for k, v in flatten_tree(self.abstract_params()).items()}

    def init_params(self, rng) -> dict:
        init = jax.jit(lambda r: nn.unbox(self.init_call(r, **self.dummy_inputs())["params"]))
        return init(rng)

    def param_shardings(self, mesh=None):
        mesh = mesh if mesh is not None else self.mesh
        return param_shardings(self.abstract_params(), self.logical_specs(), mesh)

    def _place(self, params):
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, params)
        shardings = self.param_shardings()
        return jax.tree.map(lambda p, s: jax.device_put(p, s), params, shardings)

    def num_params(self) -> int:
        return int(sum(np.prod(p.shape) for p in jax.tree.leaves(self.params)))

    # ---- forward ----------------------------------------------------------------------------------
    def _forward_signature(self) -> inspect.Signature:
        return inspect.signature(self.forward)

    def __call__(self, **kwargs):
        sig = self._forward_signature()
        params_ = sig.parameters
        has_var_kw = any(p.kind == p.VAR_KEYWORD for p in params_.values())
        unknown = [k for k in kwargs if k not in params_ and k != "params"]
        if unknown and not has_var_kw:
            raise TypeError(
                f"{type(self).__name__}() got unexpected keyword arguments {unknown}; "
                f"accepted: {[k for k in params_ if k != 'params']}"
            )
        arrays, static = {}, {}
        for k, v in kwargs.items():
            if _is_array_like(v) or (hasattr(v, "detach") and hasattr(v, "numpy")):
                arrays[k] = _to_array(v)
            else:
                static[k] = v
        key = (tuple(sorted(arrays)), tuple(sorted((k, repr(v)) for k, v in static.items())))
        fn = self._jit_cache.get(key)
        if fn is None:
            static_items = dict(static)

            def run(params, arrs):
                with nn.logical_axis_rules(LOGICAL_RULES):
                    return self.forward(params, **arrs, **static_items)

            fn = jax.jit(run)
            self._jit_cache[key] = fn
        if self.mesh is not None:
            with jax.set_mesh(self.mesh):
                return fn(self.params, arrays)
        return fn(self.params, arrays)

    # ---- generation -------------------------------------------------------------------------------
    def generate(self, input_ids, attention_mask=None, **kwargs) -> np.ndarray:
        from .generation import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def drop_decode_copies(self) -> None:
        """Free the out-major weight copies that few-row decoding on CPU keeps (remade on the next such call)."""
        self._out_major = None

    def decoding(self):
        """The :class:`lmzoo.generation.Decoding` functions of this model (encoder-decoders, GLM)."""
        raise NotImplementedError(f"{type(self).__name__} does not support generation")

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def config_from_folder(cls, folder: str, hf: Mapping[str, Any], **runtime) -> ModelConfig:
        return cls.config_class.from_hf_config(hf, **runtime)

    @classmethod
    def bare(cls, config: ModelConfig, mesh=None) -> "PretrainedModel":
        """An instance with config, module and mesh but no params yet (for loaders)."""
        self = cls.__new__(cls)
        self.config, self.mesh, self.module = config, mesh, cls.make_module(config)
        self._jit_cache, self._decode_cache, self._out_major = {}, {}, None
        return self

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state_dict, *, mesh=None, source="checkpoint", verbose=False, progress=None):
        from lmzoo.convert.keymap import load_params

        self = cls.bare(config, mesh)
        shapes = self.param_shapes()
        shardings = None
        if mesh is not None:
            from lmzoo.convert.keymap import flatten_tree

            shardings = flatten_tree(self.param_shardings(mesh))
        pdtype = np.dtype(config.params_dtype)

        def put(path, a):
            return jax.device_put(a, shardings[path]) if shardings is not None else jnp.asarray(a)

        params, report = load_params(
            state_dict, cls.key_map(config), shapes, dtype=pdtype, put=put, progress=progress, source=source
        )
        if verbose and report["dropped"]:
            print(f"dropped {len(report['dropped'])} keys the original ignores too: {', '.join(report['dropped'])}")
        self.params = params
        self.load_report = report
        return self

    # ---- saving -----------------------------------------------------------------------------------
    def export_config(self) -> dict:
        hf = self.config.to_hf_config()
        if self.architecture and not hf.get("architectures"):
            hf["architectures"] = [self.architecture]
        return hf

    def extra_files(self) -> dict[str, Any]:
        """Extra files (name -> json-able dict or bytes) a family writes next to config.json."""
        return {}

    def save_pretrained(self, out_dir: str | os.PathLike, format: str = "orbax", *, dtype=None, progress=None) -> str:
        """Write config.json + weights atomically (a temp folder renamed into place)."""
        from lmzoo.convert import writers

        out_dir = os.path.abspath(os.fspath(out_dir))
        if format not in ("orbax", "safetensors", "pytorch"):
            raise ValueError(f"format must be 'orbax', 'safetensors' or 'pytorch', got {format!r}")
        with writers.atomic_folder(out_dir) as tmp:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(self.export_config(), f, indent=2, sort_keys=True)
                f.write("\n")
            for name, content in self.extra_files().items():
                p = os.path.join(tmp, name)
                os.makedirs(os.path.dirname(p), exist_ok=True)
                if isinstance(content, (bytes, bytearray)):
                    with open(p, "wb") as f:
                        f.write(content)
                else:
                    with open(p, "w") as f:
                        json.dump(content, f, indent=2)
            with open(os.path.join(tmp, LMZOO_MARKER), "w") as f:
                json.dump({"family": self.family, "format": format, "class": type(self).__name__}, f, indent=2)
            if format == "orbax":
                writers.write_orbax(os.path.join(tmp, "params"), self.params, dtype=dtype)
            else:
                tensors = writers.export_tensors(self.params, self.key_map(self.config), dtype=dtype)
                if format == "safetensors":
                    writers.write_safetensors(os.path.join(tmp, "model.safetensors"), tensors, progress=progress)
                else:
                    writers.write_torch_zip(os.path.join(tmp, "pytorch_model.bin"), tensors, progress=progress)
        return out_dir


def from_pretrained(
    path: str | os.PathLike,
    dtype=None,
    param_dtype=None,
    attention_impl: str = "xla",
    mesh=None,
    *,
    verbose: bool = False,
    progress=None,
    **config_overrides,
) -> PretrainedModel:
    """Load an original checkpoint folder (or a folder lmzoo wrote) as an lmzoo model."""
    from lmzoo.convert import writers
    from lmzoo.convert.checkpoint import open_checkpoint

    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: not a folder (expected config.json and weights)")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise ConfigError(f"{folder}: no config.json")
    hf = read_json(cfg_path)
    marker = os.path.join(folder, LMZOO_MARKER)
    meta = read_json(marker) if os.path.exists(marker) else {}
    family = meta.get("family") or detect_family(hf, folder)
    cls = model_class_for(family, hf)
    runtime = {"attention_impl": attention_impl}
    if dtype is not None:
        runtime["dtype"] = jnp.dtype(dtype).name
    if param_dtype is not None:
        runtime["param_dtype"] = jnp.dtype(param_dtype).name
    config = cls.config_from_folder(folder, hf, **runtime)
    if config_overrides:
        config = config.replace(**config_overrides)
    if meta.get("format") == "orbax":
        model = cls.bare(config, mesh)
        abstract = model.abstract_params()
        params = writers.read_orbax(os.path.join(folder, "params"), abstract)
        params = jax.tree.map(lambda a: a.astype(config.params_dtype), params)
        model.params = model._place(params)
        return model
    sd = open_checkpoint(folder)
    return cls.from_state_dict(config, sd, mesh=mesh, source=sd.source, verbose=verbose, progress=progress)
