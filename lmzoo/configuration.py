"""Base class of the per-family config dataclasses (frozen, ``from_hf_config`` / ``to_hf_config``)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar, Mapping

import jax.numpy as jnp

__all__ = ["ModelConfig", "ConfigError", "GENERATION_DEFAULTS", "resolve_dtype", "read_json"]


class ConfigError(ValueError):
    """A config file or field is missing, malformed or inconsistent."""


# transformers' PretrainedConfig defaults for the generation keys a config.json may carry.
GENERATION_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
    "bad_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "decoder_start_token_id": None,
}

RUNTIME_FIELDS = ("dtype", "param_dtype", "attention_impl")
ATTENTION_IMPLS = ("xla", "pallas")


def resolve_dtype(name: Any):
    if name is None:
        return jnp.float32
    if isinstance(name, str):
        try:
            return jnp.dtype(name).type
        except TypeError:
            raise ConfigError(f"unknown dtype {name!r}") from None
    return jnp.dtype(name).type


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Fields shared by every family: runtime settings plus the original config.json, kept verbatim.

    Subclasses declare the architecture fields under the names the original config uses and map any
    renamed/derived keys in ``from_hf_config``. ``hf_config`` holds the file as read, so exporting writes
    back the keys lmzoo does not model (generation settings, ``auto_map``, ...).
    """

    family: ClassVar[str] = ""
    model_type: ClassVar[str] = ""

    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention_impl: str = "xla"
    hf_config: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        resolve_dtype(self.dtype)
        resolve_dtype(self.param_dtype)

    # -- conversion -----------------------------------------------------------------------------
    @classmethod
    def architecture_fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in RUNTIME_FIELDS + ("hf_config",)]

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **runtime) -> "ModelConfig":
        kwargs = {name: hf[name] for name in cls.architecture_fields() if name in hf}
        return cls(**kwargs, **runtime, hf_config=dict(hf))

    def to_hf_config(self) -> dict[str, Any]:
        out = dict(self.hf_config)
        for name in self.architecture_fields():
            out[name] = getattr(self, name)
        if self.model_type:
            out.setdefault("model_type", self.model_type)
        return out

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def compute_dtype(self):
        return resolve_dtype(self.dtype)

    @property
    def params_dtype(self):
        return resolve_dtype(self.param_dtype)

    # -- generation ------------------------------------------------------------------------------
    def generation_defaults(self) -> dict[str, Any]:
        """Generation kwargs a plain transformers ``generate()`` would take from this config."""
        out = dict(GENERATION_DEFAULTS)
        for k in GENERATION_DEFAULTS:
            if k in self.hf_config:
                out[k] = self.hf_config[k]
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **runtime) -> "ModelConfig":
        return cls.from_hf_config(read_json(os.fspath(path)), **runtime)
