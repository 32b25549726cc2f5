"""GGUF files (llama.cpp's format): metadata → ModelConfig, tensors dequantised to fp32.

Tensor data is dequantised with the ``gguf`` package (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0 and the K-quants Q2_K…Q6_K). GGUF stores shapes in ggml order (fastest dimension first), so
they are reversed to torch's (out, in).

llama.cpp's converter permutes the rows of W_Q and W_K of ``llama`` models so that its RoPE can
rotate adjacent pairs (x0, x1), (x2, x3)…; our RoPE (like Hugging Face's) rotates (x_i, x_{i+d/2}).
:func:`unpermute_rope_rows` undoes it. Gemma-3 and Qwen3 files are not permuted.
"""

import math
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize

from attnlab.config import ModelConfig
from attnlab.errors import WeightsFormatError

SUPPORTED_ARCHITECTURES = ("llama", "qwen3", "gemma3")
DEQUANTISABLE = tuple(
    gguf.GGMLQuantizationType[name] for name in
    ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
)
GEMMA3_GLOBAL_EVERY = 6  # llama.cpp's fixed Gemma-3 pattern: 5 sliding-window layers, then 1 global
GEMMA3_LOCAL_ROPE_BASE = 10000.0


def open_gguf(path: Path) -> gguf.GGUFReader:
    """Open a GGUF file, turning every parse failure into one clear WeightsFormatError."""
    if not path.is_file():
        raise WeightsFormatError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as error:  # the reader raises ValueError, struct/IndexError… on bad files
        raise WeightsFormatError(f"{path}: not a valid GGUF file, truncated or corrupt ({error})") from None


def metadata_value(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    arch = metadata_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise WeightsFormatError(
            f"{path}: unknown architecture {arch!r}; supported GGUF architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def meta(key: str, default=None):
        value = metadata_value(reader, f"{arch}.{key}", default)
        if value is None:
            raise WeightsFormatError(f"{path}: metadata field {arch}.{key} is missing")
        return value

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise WeightsFormatError(f"{path}: tensor token_embd.weight is missing")
    d_model = int(meta("embedding_length"))
    n_heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", d_model // n_heads))
    rope_dims = int(meta("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise WeightsFormatError(f"{path}: partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    n_layers = int(meta("block_count"))
    common = dict(
        family=arch, vocab_size=int(tensors["token_embd.weight"].shape[-1]), d_model=d_model, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=int(meta("attention.head_count_kv", n_heads)), head_dim=head_dim,
        d_ff=int(meta("feed_forward_length")), context_length=int(meta("context_length")),
        norm="rmsnorm", norm_eps=float(meta("attention.layer_norm_rms_epsilon")), mlp="glu",
        positions="rope", rope_theta=float(meta("rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in tensors,
    )
    if arch == "llama":
        return ModelConfig(**common, activation="silu")
    if arch == "qwen3":
        return ModelConfig(**common, activation="silu", qk_norm=True)
    # gemma3. llama.cpp's converter stores RMSNorm weights with Gemma's "+1" already added, so
    # the loaded norms use the plain w form (norm_unit_offset=False) — same arithmetic.
    return ModelConfig(
        **common, activation="gelu_tanh", norm_placement="sandwich", qk_norm=True, attn_scale=head_dim ** -0.5,
        sliding_window=int(meta("attention.sliding_window")),
        layer_types=["global" if (i + 1) % GEMMA3_GLOBAL_EVERY == 0 else "local" for i in range(n_layers)],
        rope_theta_local=GEMMA3_LOCAL_ROPE_BASE, embedding_scale=math.sqrt(d_model),
        final_logit_softcap=metadata_value(reader, "gemma3.final_logit_softcapping"),
    )


def dequantised(tensor, path: Path) -> torch.Tensor:
    """One GGUF tensor as an fp32 torch tensor in torch's (out, in) order."""
    if tensor.tensor_type not in DEQUANTISABLE:
        raise WeightsFormatError(
            f"{path}: tensor {tensor.name} has quant type {tensor.tensor_type.name}, which attnlab cannot "
            f"dequantise; supported: {', '.join(t.name for t in DEQUANTISABLE)}"
        )
    shape = tuple(int(n) for n in reversed(tensor.shape))
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except Exception as error:
        raise WeightsFormatError(f"{path}: tensor {tensor.name} cannot be decoded ({error})") from None
    values = np.asarray(values, dtype=np.float32).reshape(shape)  # reader data is a read-only memmap: copy
    return torch.from_numpy(values.copy())


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: interleaved pairs → halves, per head."""
    rows, d_in = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, d_in).transpose(1, 2).reshape(rows, d_in)


GGUF_BLOCK_NAMES = {
    "attn_norm": "attention_norm", "attn_q": "attention.w_q", "attn_k": "attention.w_k", "attn_v": "attention.w_v",
    "attn_output": "attention.w_o", "attn_q_norm": "attention.q_norm", "attn_k_norm": "attention.k_norm",
    "ffn_norm": "mlp_norm", "ffn_gate": "mlp.w_gate", "ffn_up": "mlp.w_up", "ffn_down": "mlp.w_down",
    "post_attention_norm": "post_attention_norm", "post_ffw_norm": "post_mlp_norm",
}


def load_gguf(path: Path, reader: gguf.GGUFReader | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    reader = reader or open_gguf(path)
    config = config_from_gguf(reader, path)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name, module = tensor.name, None
        if name == "token_embd.weight":
            target = "token_embedding.weight"
        elif name == "output_norm.weight":
            target = "final_norm.weight"
        elif name == "output.weight":
            target = "lm_head.weight"
        elif name.startswith("blk."):
            _, layer, module, param = name.split(".")
            if module not in GGUF_BLOCK_NAMES:
                raise WeightsFormatError(f"{path}: unexpected tensor {name} for a {config.family} model")
            target = f"blocks.{layer}.{GGUF_BLOCK_NAMES[module]}.{param}"
        elif name == "rope_freqs.weight":
            raise WeightsFormatError(f"{path}: RoPE frequency scaling (rope_freqs) is not supported")
        else:
            raise WeightsFormatError(f"{path}: unexpected tensor {name} for a {config.family} model")
        weight = dequantised(tensor, path)
        if config.family == "llama" and module in ("attn_q", "attn_k"):
            weight = unpermute_rope_rows(weight, config.n_heads if module == "attn_q" else config.n_kv_heads)
        state[target] = weight
    return config, state
