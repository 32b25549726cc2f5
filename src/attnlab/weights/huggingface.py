"""Hugging Face checkpoint folders: config.json + one or many .safetensors (+ tokenizer.json).

Each family maps HF's parameter names onto attnlab's; GPT-2's fused Conv1D c_attn is split into
separate W_Q, W_K, W_V (and transposed: Conv1D stores (in, out)).
"""

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from attnlab.config import ModelConfig
from attnlab.errors import ModelNotFoundError, WeightsFormatError

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen3", "gemma3_text", "bert")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightsFormatError(f"{path}: not valid JSON ({error})") from None


def _rope_theta(hf: dict, layer_kind: str | None = None) -> float:
    """RoPE base from transformers 5's ``rope_parameters`` (flat or per layer kind) or the older keys."""
    params = hf.get("rope_parameters") or {}
    if layer_kind and layer_kind in params:
        params = params[layer_kind]
    if params.get("rope_type", "default") != "default":
        raise WeightsFormatError(f"RoPE scaling type {params['rope_type']!r} is not supported")
    if hf.get("rope_scaling"):
        raise WeightsFormatError(f"rope_scaling {hf['rope_scaling']!r} is not supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict) -> ModelConfig:
    """Translate a Hugging Face config.json into a ModelConfig."""
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:
        hf, model_type = hf["text_config"], "gemma3_text"
    if model_type == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise WeightsFormatError("GPT-2 variants with scale_attn_by_inverse_layer_idx are not supported")
        d = hf["n_embd"]
        return ModelConfig(
            family="gpt2", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
            n_kv_heads=hf["n_head"], head_dim=d // hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
            context_length=hf["n_positions"], norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            mlp="gelu", activation=_activation(hf.get("activation_function", "gelu_new")),
            qkv_bias=True, out_bias=True, mlp_bias=True, positions="learned",
            tie_embeddings=hf.get("tie_word_embeddings", True),
        )
    if model_type in ("llama", "qwen3"):
        n_heads = hf["num_attention_heads"]
        d = hf["hidden_size"]
        layer_types = hf.get("layer_types") or []
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        return ModelConfig(
            family=model_type, vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or d // n_heads, d_ff=hf["intermediate_size"],
            context_length=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="glu", activation=_activation(hf.get("hidden_act", "silu")),
            qkv_bias=hf.get("attention_bias", False), out_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False), qk_norm=model_type == "qwen3", positions="rope",
            rope_theta=_rope_theta(hf), tie_embeddings=hf.get("tie_word_embeddings", False),
            sliding_window=sliding,
            layer_types=[_layer_kind(t) for t in layer_types] if sliding else [],
        )
    if model_type == "gemma3_text":
        d = hf["hidden_size"]
        return ModelConfig(
            family="gemma3", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], n_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"],
            d_ff=hf["intermediate_size"], context_length=hf.get("max_position_embeddings", 131072),
            norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), norm_unit_offset=True, norm_placement="sandwich",
            mlp="glu", activation=_activation(hf.get("hidden_activation", "gelu_pytorch_tanh")),
            qkv_bias=hf.get("attention_bias", False), out_bias=hf.get("attention_bias", False), qk_norm=True,
            attn_scale=hf.get("query_pre_attn_scalar", hf["head_dim"]) ** -0.5,
            # Gemma-3's config keeps attn_logit_softcapping from Gemma-2, but the model never applies it.
            sliding_window=hf.get("sliding_window"),
            layer_types=[_layer_kind(t) for t in hf["layer_types"]], positions="rope",
            rope_theta=_rope_theta(hf, "full_attention"),
            rope_theta_local=_rope_theta(hf, "sliding_attention") if "rope_parameters" in hf
            else float(hf.get("rope_local_base_freq", 10000.0)),
            tie_embeddings=hf.get("tie_word_embeddings", True), embedding_scale=math.sqrt(d),
            final_logit_softcap=hf.get("final_logit_softcapping"),
        )
    if model_type == "bert":
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise WeightsFormatError(f"BERT position_embedding_type {hf['position_embedding_type']!r} is not supported")
        return ModelConfig(
            family="bert", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], n_kv_heads=hf["num_attention_heads"],
            head_dim=hf["hidden_size"] // hf["num_attention_heads"], d_ff=hf["intermediate_size"],
            context_length=hf["max_position_embeddings"], norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
            norm_placement="post", mlp="gelu", activation=_activation(hf.get("hidden_act", "gelu")), causal=False,
            qkv_bias=True, out_bias=True, mlp_bias=True, positions="learned",
            type_vocab_size=hf.get("type_vocab_size", 2), embedding_norm=True, final_norm=False, lm_head=False,
        )
    raise WeightsFormatError(
        f"unknown architecture model_type={model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def _activation(hf_name: str) -> str:
    names = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
             "gelu": "gelu", "silu": "silu", "swish": "silu", "relu": "relu"}
    if hf_name not in names:
        raise WeightsFormatError(f"unsupported activation {hf_name!r}; supported: {', '.join(names)}")
    return names[hf_name]


def _layer_kind(hf_layer_type: str) -> str:
    return "local" if hf_layer_type == "sliding_attention" else "global"


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's .safetensors files (one file or shards listed in an index)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder}: no .safetensors weights found")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError) as error:
            raise WeightsFormatError(f"{path}: corrupt or truncated safetensors file ({error})") from None
    return tensors


def _strip_prefixes(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in tensors.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        out[name] = tensor
    return out


def convert_state_dict(config: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF parameter names → attnlab's. Extra heads we do not model (BERT pooler, MLM head) are dropped."""
    if config.family == "gpt2":
        return _convert_gpt2(config, _strip_prefixes(hf, ("transformer.",)))
    if config.family == "bert":
        return _convert_bert(config, _strip_prefixes(hf, ("bert.",)))
    return _convert_llama_like(config, _strip_prefixes(hf, ("model.language_model.", "model.")))


def _convert_llama_like(config: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"token_embedding.weight": hf["embed_tokens.weight"], "final_norm.weight": hf["norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    names = {
        "self_attn.q_proj": "attention.w_q", "self_attn.k_proj": "attention.w_k", "self_attn.v_proj": "attention.w_v",
        "self_attn.o_proj": "attention.w_o", "self_attn.q_norm": "attention.q_norm",
        "self_attn.k_norm": "attention.k_norm", "mlp.gate_proj": "mlp.w_gate", "mlp.up_proj": "mlp.w_up",
        "mlp.down_proj": "mlp.w_down", "input_layernorm": "attention_norm",
    }
    if config.norm_placement == "sandwich":  # Gemma-3
        names |= {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "mlp_norm",
                  "post_feedforward_layernorm": "post_mlp_norm"}
    else:
        names |= {"post_attention_layernorm": "mlp_norm"}
    for name, tensor in hf.items():
        if not name.startswith("layers."):
            continue
        _, layer, rest = name.split(".", 2)
        module, param = rest.rsplit(".", 1)
        if module in names:
            out[f"blocks.{layer}.{names[module]}.{param}"] = tensor
    return out


def _convert_gpt2(config: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {
        "token_embedding.weight": hf["wte.weight"], "position_embedding.weight": hf["wpe.weight"],
        "final_norm.weight": hf["ln_f.weight"], "final_norm.bias": hf["ln_f.bias"],
    }
    if not config.tie_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    d = config.d_model
    for layer in range(config.n_layers):
        p, b = f"h.{layer}.", f"blocks.{layer}."
        # Conv1D keeps weights as (in, out): transpose to nn.Linear's (out, in).
        w_qkv, b_qkv = hf[p + "attn.c_attn.weight"].T, hf[p + "attn.c_attn.bias"]
        for index, target in enumerate(("w_q", "w_k", "w_v")):
            out[b + f"attention.{target}.weight"] = w_qkv[index * d:(index + 1) * d].contiguous()
            out[b + f"attention.{target}.bias"] = b_qkv[index * d:(index + 1) * d]
        pairs = {"attn.c_proj": "attention.w_o", "mlp.c_fc": "mlp.w_in", "mlp.c_proj": "mlp.w_out"}
        for source, target in pairs.items():
            out[b + target + ".weight"] = hf[p + source + ".weight"].T.contiguous()
            out[b + target + ".bias"] = hf[p + source + ".bias"]
        for source, target in (("ln_1", "attention_norm"), ("ln_2", "mlp_norm")):
            out[b + target + ".weight"] = hf[p + source + ".weight"]
            out[b + target + ".bias"] = hf[p + source + ".bias"]
    return out


def _convert_bert(config: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    e = "embeddings."
    out = {
        "token_embedding.weight": hf[e + "word_embeddings.weight"],
        "position_embedding.weight": hf[e + "position_embeddings.weight"],
        "token_type_embedding.weight": hf[e + "token_type_embeddings.weight"],
        "embedding_norm.weight": hf[e + "LayerNorm.weight"], "embedding_norm.bias": hf[e + "LayerNorm.bias"],
    }
    pairs = {
        "attention.self.query": "attention.w_q", "attention.self.key": "attention.w_k",
        "attention.self.value": "attention.w_v", "attention.output.dense": "attention.w_o",
        "attention.output.LayerNorm": "attention_norm", "intermediate.dense": "mlp.w_in",
        "output.dense": "mlp.w_out", "output.LayerNorm": "mlp_norm",
    }
    for layer in range(config.n_layers):
        for source, target in pairs.items():
            for param in ("weight", "bias"):
                out[f"blocks.{layer}.{target}.{param}"] = hf[f"encoder.layer.{layer}.{source}.{param}"]
    return out


def load_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config = config_from_hf(read_config(folder))
    tensors = read_safetensors(folder)
    try:
        return config, convert_state_dict(config, tensors)
    except KeyError as error:
        raise WeightsFormatError(f"{folder}: tensor {error.args[0]} missing for a {config.family} model") from None
