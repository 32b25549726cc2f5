"""Write a tiny transformers Llama model as a GGUF file the way llama.cpp's converter does.

Used to test the GGUF path (metadata → config, dequantisation of each quant type, the Q/K row
un-permutation) against transformers, which reads the same file with ``gguf_file=``.
"""

from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's row order for W_Q / W_K: per head, halves → interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def byte_level_vocabulary(size: int) -> list[str]:
    """A valid byte-level BPE vocabulary of ``size`` tokens: GPT-2's byte alphabet and one merge."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    alphabet = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
    return alphabet[:size - 1] + [alphabet[0] + alphabet[1]]  # the last token is the one merge


def write_llama_gguf(model, path: Path, quant: str = "F32") -> Path:
    config = model.config
    state = {name: tensor.detach().numpy().astype(np.float32) for name, tensor in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    head_dim = config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    tokens = byte_level_vocabulary(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([f"{tokens[0]} {tokens[1]}"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(False)

    def add(name: str, array: np.ndarray, quantised: bool = True) -> None:
        if quantised and quant != "F32":
            kind = gguf.GGMLQuantizationType[quant]
            writer.add_tensor(name, quantize(array, kind), raw_dtype=kind)  # shape is read from the bytes
        else:
            writer.add_tensor(name, array)

    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"], quantised=False)
    if "lm_head.weight" in state and not config.tie_word_embeddings:
        add("output.weight", state["lm_head.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for source, target in names.items():
            weight = state[prefix + source + ".weight"]
            if target == "attn_q":
                weight = llama_cpp_permute(weight, config.num_attention_heads)
            elif target == "attn_k":
                weight = llama_cpp_permute(weight, config.num_key_value_heads)
            add(f"blk.{layer}.{target}.weight", weight)
        add(f"blk.{layer}.attn_norm.weight", state[prefix + "input_layernorm.weight"], quantised=False)
        add(f"blk.{layer}.ffn_norm.weight", state[prefix + "post_attention_layernorm.weight"], quantised=False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
