"""ModelConfig: every architecture attnlab runs is this one dataclass wiring the same few parts.

GPT-2, Llama (SmolLM2), Qwen3, Gemma-3 and BERT differ only in the choices below (which norm,
which MLP, where positions come from, which layers look at a local window...). The model code
in ``model.py`` reads these fields; it never branches on the family name.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from attnlab.errors import WeightsFormatError

Family = Literal["gpt2", "llama", "qwen3", "gemma3", "bert"]
FAMILIES: tuple[str, ...] = ("gpt2", "llama", "qwen3", "gemma3", "bert")


@dataclass
class ModelConfig:
    family: Family
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # = n_heads: multi-head; 1 < n < n_heads: grouped-query; 1: multi-query
    head_dim: int
    d_ff: int
    context_length: int

    # Norms. "pre": x + f(norm(x)) (GPT-2, Llama); "post": norm(x + f(x)) (BERT);
    # "sandwich": x + norm(f(norm(x))) (Gemma-3).
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm's additive b (RMSNorm has none)
    norm_unit_offset: bool = False  # Gemma's RMSNorm scales by (1 + w) instead of w
    norm_placement: Literal["pre", "post", "sandwich"] = "pre"

    # MLP: "gelu" = W_out·act(W_in·x); "glu" = W_down·(act(W_gate·x) ⊙ W_up·x) (SwiGLU / GeGLU).
    mlp: Literal["gelu", "glu"] = "glu"
    activation: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"

    # Attention.
    attention: str = "softmax"  # the variant (variants.py): softmax, no-q, merged-qk:8, linear:elu, …
    causal: bool = True  # False for encoders (BERT): every token sees every other token
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma-3)
    attn_scale: float | None = None  # None: 1/sqrt(head_dim); Gemma uses query_pre_attn_scalar**-0.5
    attn_logit_softcap: float | None = None  # scores -> c·tanh(scores/c) (Gemma-2 style)
    sliding_window: int | None = None  # window of the "local" layers
    layer_types: list[str] = field(default_factory=list)  # per layer "global" | "local"; empty = all global

    # Positions. "rope": rotary on q, k; "learned": absolute embedding added to the input.
    positions: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_theta_local: float | None = None  # Gemma-3's local layers rotate with another base
    type_vocab_size: int = 0  # BERT's segment embeddings

    # Embeddings and output.
    tie_embeddings: bool = True
    embedding_scale: float | None = None  # Gemma multiplies embeddings by sqrt(d_model)
    embedding_norm: bool = False  # BERT normalises the summed embeddings
    final_norm: bool = True  # BERT has none (its blocks end with a norm)
    final_logit_softcap: float | None = None
    lm_head: bool = True  # encoders loaded as bare BertModel have no LM head

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Fail early, with the field name, on values no model can be built from."""
        if self.family not in FAMILIES:
            raise WeightsFormatError(f"unknown architecture family {self.family!r}; supported: {', '.join(FAMILIES)}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise WeightsFormatError(f"config field {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise WeightsFormatError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise WeightsFormatError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.layer_types and len(self.layer_types) != self.n_layers:
            raise WeightsFormatError(
                f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers"
            )
        if "local" in self.layer_types and not self.sliding_window:
            raise WeightsFormatError("layer_types names local layers but sliding_window is not set")
        from attnlab.variants import check_compatible, parse_variant  # variants builds on this module

        check_compatible(parse_variant(self.attention), self)

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types else "global"

    def mask_type(self, layer: int) -> str:
        """Which mask a layer uses: its type, except that the sliding-window variant makes every layer local
        (positions still rotate as the layer type says)."""
        from attnlab.variants import parse_variant

        return "local" if parse_variant(self.attention).window else self.layer_type(layer)

    @property
    def local_window(self) -> int | None:
        """The window of the local layers: the sliding-window variant's w, else ``sliding_window``."""
        from attnlab.variants import parse_variant

        return parse_variant(self.attention).window or self.sliding_window

    @property
    def is_encoder(self) -> bool:
        return not self.causal

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise WeightsFormatError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)

    def n_parameters(self) -> int:
        """Parameter count implied by the config (tied embeddings counted once)."""
        d, h = self.d_model, self.head_dim
        attention = d * h * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.qkv_bias:
            attention += h * (self.n_heads + 2 * self.n_kv_heads)
        if self.out_bias:
            attention += d
        if self.qk_norm:
            attention += 2 * h
        mlp = (3 if self.mlp == "glu" else 2) * d * self.d_ff
        if self.mlp_bias:
            mlp += self.d_ff * (2 if self.mlp == "glu" else 1) + d
        norm_size = d * (2 if self.norm == "layernorm" and self.norm_bias else 1)
        norms_per_block = 4 if self.norm_placement == "sandwich" else 2
        from attnlab.variants import attention_parameter_change

        attention += attention_parameter_change(self)
        total = self.n_layers * (attention + mlp + norms_per_block * norm_size)
        total += self.vocab_size * d
        if self.positions == "learned":
            total += self.context_length * d
        total += self.type_vocab_size * d
        total += norm_size * (int(self.final_norm) + int(self.embedding_norm))
        if self.lm_head and not self.tie_embeddings:
            total += self.vocab_size * d
        return total
