"""What a training run is: one TOML file (or a preset) with three tables, [model], [data], [train].

    [model]   family ("gpt2": LayerNorm, GELU MLP, learned positions, biases; "llama": RMSNorm,
              SwiGLU, RoPE, no biases) and sizes; any other ModelConfig field may be set too
    [data]    corpus (a named corpus, a file or a folder), tokenizer ("char", "gpt2", or a
              pretrained model's name), context, val_fraction
    [train]   batch size, accumulation, AdamW, schedule, clipping, dtype, seed, intervals, out_dir

``--set train.lr=3e-4`` overrides one key (values are parsed as TOML: 3e-4, true, "text").
"""

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from attnlab.config import ModelConfig
from attnlab.errors import AttnlabError, InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class DataConfig:
    corpus: str = "shakespeare"
    tokenizer: str = "char"  # "char", "gpt2", or a named/pretrained model whose tokenizer to use
    context: int = 64  # tokens per training sequence (the model's context length)
    val_fraction: float = 0.1  # the last 10% of the tokens are held out


@dataclass
class TrainLoopConfig:
    batch_size: int = 12  # sequences per micro-batch (split across processes under torchrun)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decay from lr to min_lr over max_steps
    warmup_steps: int = 100  # linear warm-up from 0
    weight_decay: float = 0.1  # on matrices and embeddings only, not on norms and biases
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast)
    seed: int = 1337
    eval_interval: int = 250  # steps between evaluations (and at the end)
    eval_batches: int = 20  # batches of each split per evaluation
    checkpoint_interval: int = 500  # steps between checkpoints (and at the end)
    log_interval: int = 10  # steps between progress-bar updates / metric lines
    out_dir: str = "runs/run"


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)

    def to_dict(self) -> dict:
        return {"model": dict(self.model), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train)}

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The ModelConfig of this run: family defaults, then the [model] table, then data facts."""
        settings = dict(self.model)
        family = settings.pop("family", "gpt2")
        d_model = settings.get("d_model", 128)
        n_heads = settings.get("n_heads", 4)
        if "head_dim" not in settings and d_model % n_heads:
            raise InputError(f"[model]: d_model {d_model} is not divisible by n_heads {n_heads}; change one, "
                             f"or set model.head_dim to choose the head size explicitly")
        defaults = FAMILY_DEFAULTS[family] | {
            "d_model": d_model, "n_layers": 4, "n_heads": n_heads, "n_kv_heads": n_heads,
            "head_dim": d_model // n_heads,
            "d_ff": 4 * d_model if family == "gpt2" else _swiglu_width(d_model),
        }
        try:
            return ModelConfig(family=family, vocab_size=vocab_size, context_length=self.data.context,
                               **(defaults | settings))
        except AttnlabError as error:
            raise InputError(f"[model]: {error}") from None


FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(norm="layernorm", mlp="gelu", activation="gelu_tanh", positions="learned", qkv_bias=True,
                 out_bias=True, mlp_bias=True, tie_embeddings=True),
    "llama": dict(norm="rmsnorm", mlp="glu", activation="silu", positions="rope", rope_theta=10000.0,
                  tie_embeddings=True),
}


def _swiglu_width(d_model: int) -> int:
    """SwiGLU's hidden width: 8/3·d keeps the parameter count of a 4·d GELU MLP; rounded up to 32."""
    return 32 * math.ceil(8 * d_model / 3 / 32)


_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size", "context_length"}
_SECTIONS = {"data": DataConfig, "train": TrainLoopConfig}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # nanoGPT's CPU baseline on Shakespeare (its config/train_shakespeare_char.py with the CPU overrides;
    # like nanoGPT: exact GELU, no biases in the linear layers).
    "shakespeare-char": {
        "model": {"family": "gpt2", "n_layers": 4, "n_heads": 4, "d_model": 128, "activation": "gelu",
                  "qkv_bias": False, "out_bias": False, "mlp_bias": False, "norm_bias": False},
        "data": {"corpus": "shakespeare", "tokenizer": "char", "context": 64},
        "train": {"batch_size": 12, "max_steps": 2000, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100,
                  "out_dir": "runs/shakespeare-char"},
    },
    # The same size and the same wall-clock budget with a modern block: RoPE, RMSNorm, SwiGLU, no biases.
    # Its steps cost ~12% more on a CPU (RoPE and RMSNorm are many small element-wise ops), so it gets
    # 1750 steps to finish in the time the GPT-2 block takes for 2000 (bench/train.py measures both).
    "shakespeare-char-modern": {
        "model": {"family": "llama", "n_layers": 4, "n_heads": 4, "d_model": 128},
        "data": {"corpus": "shakespeare", "tokenizer": "char", "context": 64},
        "train": {"batch_size": 12, "max_steps": 1750, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 100,
                  "out_dir": "runs/shakespeare-char-modern"},
    },
    # The base of `attnlab ablate`'s example: GPT-2 block (learned positions, so merged-qk can run), small enough
    # that 7 variants × 3 seeds train in ~12 minutes on 2 CPU cores. Evaluation happens once, at the end.
    "ablation-char": {
        "model": {"family": "gpt2", "n_layers": 4, "n_heads": 4, "d_model": 128, "activation": "gelu",
                  "qkv_bias": False, "out_bias": False, "mlp_bias": False, "norm_bias": False},
        "data": {"corpus": "shakespeare", "tokenizer": "char", "context": 64},
        "train": {"batch_size": 12, "max_steps": 600, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 50,
                  "eval_batches": 1, "log_interval": 20, "out_dir": "runs/ablation-char"},
    },
}


def valid_keys() -> list[str]:
    keys = [f"model.{k}" for k in sorted(_MODEL_KEYS | {"family"})]
    for section, cls in _SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def build_config(tables: dict[str, Any], source: str) -> RunConfig:
    """A RunConfig from parsed TOML tables, refusing unknown tables/keys and impossible values."""
    unknown_tables = sorted(set(tables) - {"model", "data", "train"})
    if unknown_tables:
        raise InputError(f"{source}: unknown table [{unknown_tables[0]}]; valid tables: [model], [data], [train]")
    model = tables.get("model", {})
    unknown = sorted(set(model) - _MODEL_KEYS - {"family"})
    if unknown:
        raise InputError(f"{source}: unknown key model.{unknown[0]}; valid model keys: "
                         f"{', '.join(sorted(_MODEL_KEYS | {'family'}))}")
    if model.get("family", "gpt2") not in FAMILY_DEFAULTS:
        raise InputError(f"{source}: model.family must be one of {', '.join(FAMILY_DEFAULTS)}, "
                         f"got {model.get('family')!r}")
    sections = {}
    for name, cls in _SECTIONS.items():
        table = tables.get(name, {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - set(fields))
        if unknown:
            raise InputError(f"{source}: unknown key {name}.{unknown[0]}; valid {name} keys: {', '.join(fields)}")
        defaults = cls()
        for key, value in table.items():
            expected = type(getattr(defaults, key))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                table[key] = value = float(value)
            if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
                raise InputError(f"{source}: {name}.{key} must be {expected.__name__}, got {value!r}")
        sections[name] = cls(**table)
    config = RunConfig(model=dict(model), **sections)
    _validate(config, source)
    return config


def _validate(config: RunConfig, source: str) -> None:
    t, d = config.train, config.data
    checks = [
        (t.batch_size >= 1, "train.batch_size must be ≥ 1", t.batch_size),
        (t.grad_accum >= 1, "train.grad_accum must be ≥ 1", t.grad_accum),
        (t.max_steps >= 1, "train.max_steps must be ≥ 1", t.max_steps),
        (t.lr > 0, "train.lr must be > 0", t.lr),
        (0 <= t.min_lr <= t.lr, "train.min_lr must be in [0, lr]", t.min_lr),
        (t.warmup_steps >= 0, "train.warmup_steps must be ≥ 0", t.warmup_steps),
        (t.weight_decay >= 0, "train.weight_decay must be ≥ 0", t.weight_decay),
        (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and beta2 must be in [0, 1)", (t.beta1, t.beta2)),
        (t.grad_clip >= 0, "train.grad_clip must be ≥ 0", t.grad_clip),
        (t.dtype in ("fp32", "bf16"), "train.dtype must be fp32 or bf16", t.dtype),
        (t.eval_interval >= 1, "train.eval_interval must be ≥ 1", t.eval_interval),
        (t.eval_batches >= 1, "train.eval_batches must be ≥ 1", t.eval_batches),
        (t.checkpoint_interval >= 1, "train.checkpoint_interval must be ≥ 1", t.checkpoint_interval),
        (t.log_interval >= 1, "train.log_interval must be ≥ 1", t.log_interval),
        (d.context >= 2, "data.context must be ≥ 2", d.context),
        (0 < d.val_fraction < 1, "data.val_fraction must be in (0, 1)", d.val_fraction),
    ]
    for ok, message, value in checks:
        if not ok:
            raise InputError(f"{source}: {message}, got {value!r}")


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.lr=3e-4' → ("train", "lr", 3e-4); the value is read as TOML, falling back to a plain string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise InputError(f"--set {text!r}: expected TABLE.KEY=VALUE, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    if f"{section}.{name}" not in valid_keys():
        raise InputError(f"--set {key}: unknown key; valid keys: {', '.join(valid_keys())}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, name, value


def load_run_config(path: str | None = None, preset: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """A run's config from a TOML file or a preset, with ``--set`` overrides applied."""
    if (path is None) == (preset is None):
        raise InputError(f"give a config file or --preset NAME (presets: {', '.join(PRESETS)})")
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        tables = {name: dict(table) for name, table in PRESETS[preset].items()}
        source = f"preset {preset}"
    else:
        try:
            with open(path, "rb") as handle:
                tables = tomllib.load(handle)
        except FileNotFoundError:
            raise InputError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as error:
            raise InputError(f"{path}: invalid TOML ({error})") from None
        except OSError as error:
            raise InputError(f"{path}: cannot read it ({error.strerror})") from None
        source = str(path)
    for text in overrides:
        section, name, value = parse_override(text)
        tables.setdefault(section, {})[name] = value
    return build_config(tables, source)


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two ``RunConfig.to_dict()`` results."""
    keys = sorted(set(a) | set(b))
    differing = []
    for key in keys:
        name = f"{prefix}{key}"
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            differing += config_differences(a[key], b[key], name + ".")
        elif a.get(key) != b.get(key):
            differing.append(name)
    return differing
