"""Tiny random models of every family, built offline with transformers (the oracle) and saved."""

from pathlib import Path

import torch

VOCAB = 97


def tiny_hf_model(family: str, folder: Path, **overrides):
    """Build, seed and save a tiny transformers model of ``family``; return it in eval mode (fp32, eager)."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **overrides)
        model = tf.GPT2LMHeadModel(config)
    elif family == "llama":
        kwargs = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                      rope_theta=500.0, tie_word_embeddings=False)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**(kwargs | overrides)))
    elif family == "qwen3":
        kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                      tie_word_embeddings=True)
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**(kwargs | overrides)))
    elif family == "gemma3":
        kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      sliding_window=5, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                      query_pre_attn_scalar=12)
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**(kwargs | overrides)))
    elif family == "bert":
        kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64)
        model = tf.BertModel(tf.BertConfig(**(kwargs | overrides)), add_pooling_layer=False)
    else:
        raise ValueError(family)
    # Random init leaves norm weights at exactly 1 (or Gemma's 0): perturb every parameter so a
    # mis-mapped norm or bias cannot hide.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.config._attn_implementation = "eager"
    model.save_pretrained(folder)
    return model.eval()
