"""Model outputs: registered pytrees readable as ``out.logits`` and ``out["logits"]``."""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax

__all__ = ["ModelOutput", "Seq2SeqLMOutput", "EncoderOutput"]


class ModelOutput:
    """Mixin giving flax struct dataclasses dict-style access to their (non-None) fields."""

    def __getitem__(self, name: str) -> Any:
        if not isinstance(name, str):
            raise TypeError(f"{type(self).__name__} is indexed by output name, got {name!r}")
        try:
            value = getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None
        if value is None:
            raise KeyError(f"{name} (not computed by this call)")
        return value

    def __contains__(self, name: str) -> bool:
        return getattr(self, name, None) is not None

    def keys(self):
        return [k for k in self.__dataclass_fields__ if getattr(self, k) is not None]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self):
        return tuple(v for _, v in self.items())


@flax.struct.dataclass
class Seq2SeqLMOutput(ModelOutput):
    logits: Optional[jax.Array] = None
    encoder_last_hidden_state: Optional[jax.Array] = None
    loss: Optional[jax.Array] = None


@flax.struct.dataclass
class EncoderOutput(ModelOutput):
    last_hidden_state: Optional[jax.Array] = None
