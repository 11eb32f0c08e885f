"""The typed training config: frozen dataclasses, read from JSON, overridden by ``section.key=value``.

One :class:`TrainConfig` describes a run: the model (family, size or checkpoint), the mesh, the
optimiser and schedule, the data, the objective and the loop (steps, eval, checkpoints, logging).
Unknown keys and ill-typed values raise :class:`TrainConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, Mapping, Sequence

__all__ = [
    "TrainConfig",
    "ModelSection",
    "MeshSection",
    "OptimSection",
    "DataSection",
    "ObjectiveSection",
    "LoopSection",
    "TrainConfigError",
    "load_config",
    "apply_overrides",
]


class TrainConfigError(ValueError):
    """A training config file, key or value is invalid."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    family: str = "t5"  # t5 (LongLM), lsg_bart / bart, glm, cocolm, palm
    init: str = ""  # a checkpoint folder for lmzoo.from_pretrained; empty: random init from `config`
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # family config fields (random init)
    dtype: str = "float32"  # compute dtype ("bfloat16" for mixed precision); params stay `param_dtype`
    param_dtype: str = "float32"
    seed: int = 0  # parameter init seed


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1  # -1: the devices left over by the other axes
    fsdp: int = 1
    tensor: int = 1
    distributed: bool = False  # call jax.distributed.initialize() (multi-host)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    name: str = "adamw"  # adamw | adafactor
    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    no_decay_norms_and_biases: bool = True
    schedule: str = "linear"  # constant | linear | cosine | inverse_sqrt | noam
    warmup_steps: int = 0
    decay_steps: int = 0  # 0: the run's total steps
    end_lr_ratio: float = 0.0  # final lr / peak lr for linear and cosine decay
    clip_norm: float = 1.0  # 0 disables global-norm clipping
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimiser step


@dataclasses.dataclass(frozen=True)
class DataSection:
    train: str = ""  # a .txt (one document per line, blank lines separate nothing) or .jsonl file
    eval: str = ""
    format: str = "auto"  # auto | text | jsonl
    text_key: str = "text"  # jsonl field for pretraining text
    source_key: str = "source"  # jsonl fields for supervised fine-tuning
    target_key: str = "target"
    label_key: str = "label"
    tokenizer: str = ""  # spiece.model, tokenizer.json, vocab.txt or a folder holding one; empty: model.init
    batch_size: int = 8  # global batch (all hosts, all micro-batches)
    seq_len: int = 128  # encoder / prompt length
    target_len: int = 64  # decoder length (encoder-decoder objectives)
    seed: int = 0
    prefetch: int = 2  # batches built ahead in a background thread
    pack: bool = False  # several examples per row with segment ids (longlm, seq2seq, bart on T5 / BART; see packing.py)


@dataclasses.dataclass(frozen=True)
class ObjectiveSection:
    name: str = "longlm"  # see lmzoo.train.objectives.OBJECTIVES
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # objective-specific settings


@dataclasses.dataclass(frozen=True)
class LoopSection:
    steps: int = 100
    out_dir: str = "runs/run"
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic eval
    eval_batches: int = 4
    save_every: int = 100  # 0: only the final / preemption checkpoint
    keep: int = 3  # checkpoints kept
    async_save: bool = True
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2)
    metrics: Sequence[str] = ()  # extra eval metrics: rouge, bleu, accuracy, f1, mcc, pearson, spearman, squad
    generate_max_len: int = 64  # decoding length for generation metrics
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0: from the device kind when known


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    objective: ObjectiveSection = dataclasses.field(default_factory=ObjectiveSection)
    loop: LoopSection = dataclasses.field(default_factory=LoopSection)

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        if not isinstance(d, Mapping):
            raise TrainConfigError(f"a training config is a JSON object, got {type(d).__name__}")
        sections = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, value in d.items():
            if name not in fields:
                raise TrainConfigError(f"unknown config section {name!r}; sections: {', '.join(fields)}")
            section_cls = _section_type(name)
            if not isinstance(value, Mapping):
                raise TrainConfigError(f"config section {name!r} must be an object, got {value!r}")
            sections[name] = _build_section(section_cls, name, value)
        return cls(**sections)

    def replace(self, **overrides: Any) -> "TrainConfig":
        """``cfg.replace(**{"optim.lr": 1e-3})`` — the same dotted keys as the command line."""
        return apply_overrides(self, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()])


def _section_type(name: str) -> type:
    return typing.get_type_hints(TrainConfig)[name]


def _build_section(section_cls: type, section: str, values: Mapping[str, Any]):
    hints = typing.get_type_hints(section_cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise TrainConfigError(
                f"unknown key {section}.{key}; {section} has: {', '.join(f.name for f in dataclasses.fields(section_cls))}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return section_cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check / convert ``value`` to the field type ``tp``; strings from the command line are parsed."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise TrainConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise TrainConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise TrainConfigError(f"{key} must be an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise TrainConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TrainConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TrainConfigError(f"{key} must be a string, got {value!r}")
    if origin in (typing.Mapping, dict) or tp is Mapping or origin is Mapping or _is_mapping(tp):
        if isinstance(value, str):
            value = _parse_json(value, key)
        if not isinstance(value, Mapping):
            raise TrainConfigError(f"{key} must be an object, got {value!r}")
        return dict(value)
    if origin in (typing.Sequence, list, tuple) or _is_sequence(tp):
        if isinstance(value, str):
            value = _parse_json(value, key) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{key} must be a list, got {value!r}")
        return tuple(value)
    return value


def _is_mapping(tp) -> bool:
    import collections.abc

    return typing.get_origin(tp) is collections.abc.Mapping


def _is_sequence(tp) -> bool:
    import collections.abc

    return typing.get_origin(tp) is collections.abc.Sequence


def _parse_json(text: str, key: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TrainConfigError(f"{key}: cannot parse {text!r} as JSON ({e})") from None


def _parse_scalar(text: str):
    """A command-line value: JSON when it parses (numbers, true, objects), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply ``section.key=value`` overrides (``model.config.d_model=256`` sets one family config field)."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise TrainConfigError(f"override {item!r} is not of the form section.key=value")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) < 2:
            raise TrainConfigError(f"override {item!r}: name a section and a key, e.g. optim.lr=3e-4")
        section, key = parts[0], parts[1]
        if section not in d:
            raise TrainConfigError(f"unknown config section {section!r} in {item!r}; sections: {', '.join(d)}")
        if key not in d[section]:
            raise TrainConfigError(f"unknown key {section}.{key} in {item!r}; {section} has: {', '.join(d[section])}")
        if len(parts) > 2:  # into a mapping field: model.config.d_model=256, objective.options.mask_rate=0.15
            if not isinstance(d[section][key], dict):
                raise TrainConfigError(f"{section}.{key} is not an object; cannot set {path}")
            target = d[section][key]
            for p in parts[2:-1]:
                target = target.setdefault(p, {})
            target[parts[-1]] = _parse_scalar(text)
        else:
            d[section][key] = text
    return TrainConfig.from_dict(d)


def load_config(path_or_name: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a JSON config file and apply overrides."""
    path = os.fspath(path_or_name)
    if not os.path.exists(path):
        raise TrainConfigError(f"{path}: no such config file")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise TrainConfigError(f"{path}: invalid JSON ({e})") from None
    return apply_overrides(TrainConfig.from_dict(d), overrides)


OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "linear", "cosine", "inverse_sqrt", "noam")
DTYPES = ("float32", "bfloat16", "float16")


def validate(cfg: TrainConfig) -> None:
    def need(cond: bool, msg: str):
        if not cond:
            raise TrainConfigError(msg)

    o, d, l, m = cfg.optim, cfg.data, cfg.loop, cfg.mesh
    need(o.name in OPTIMIZERS, f"optim.name must be one of {OPTIMIZERS}, got {o.name!r}")
    need(o.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got {o.schedule!r}")
    need(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    need(o.warmup_steps >= 0 and o.decay_steps >= 0, "optim.warmup_steps / decay_steps must be >= 0")
    need(o.schedule not in ("inverse_sqrt", "noam") or o.warmup_steps > 0, f"optim.schedule={o.schedule} needs optim.warmup_steps > 0")
    need(o.clip_norm >= 0, f"optim.clip_norm must be >= 0, got {o.clip_norm}")
    need(o.accum_steps >= 1, f"optim.accum_steps must be >= 1, got {o.accum_steps}")
    need(cfg.model.dtype in DTYPES and cfg.model.param_dtype in DTYPES, f"model.dtype / param_dtype must be one of {DTYPES}")
    need(d.batch_size >= 1 and d.seq_len >= 2 and d.target_len >= 1, "data.batch_size, seq_len, target_len must be positive")
    need(d.batch_size % o.accum_steps == 0, f"data.batch_size {d.batch_size} is not divisible by optim.accum_steps {o.accum_steps}")
    need(d.format in ("auto", "text", "jsonl"), f"data.format must be auto, text or jsonl, got {d.format!r}")
    need(d.prefetch >= 0, "data.prefetch must be >= 0")
    need(l.steps >= 1, f"loop.steps must be >= 1, got {l.steps}")
    need(min(l.log_every, l.keep) >= 1, "loop.log_every and loop.keep must be >= 1")
    need(min(l.eval_every, l.save_every, l.eval_batches) >= 0, "loop.eval_every / save_every / eval_batches must be >= 0")
    for name in ("data", "fsdp", "tensor"):
        v = getattr(m, name)
        need(v == -1 or v >= 1, f"mesh.{name} must be >= 1 or -1, got {v}")
    need([m.data, m.fsdp, m.tensor].count(-1) <= 1, "at most one mesh axis may be -1")
    from .metrics import METRICS

    unknown = [x for x in l.metrics if x not in METRICS]
    need(not unknown, f"loop.metrics: unknown {unknown}; known: {sorted(METRICS)}")
