"""lmzoo: JAX/Flax re-implementations of LongLM, LSG-BART, PALM 2.0, GLM and COCO-LM.

    import lmzoo
    model = lmzoo.from_pretrained("path/to/original/checkpoint")
    out = model(input_ids=..., attention_mask=..., decoder_input_ids=...)
    ids = model.generate(input_ids, attention_mask=..., num_beams=4, max_length=64)
"""

from .configuration import ConfigError, ModelConfig
from .modeling import FAMILIES, PretrainedModel, detect_family, from_pretrained

__version__ = "0.1.0"

__all__ = ["from_pretrained", "PretrainedModel", "ModelConfig", "ConfigError", "detect_family", "FAMILIES", "__version__"]
