"""Sampling rules and text streaming."""

import pytest
import torch

from attnlab.errors import InputError
from attnlab.generate import SamplingConfig, sample_next_token, stream_text


def test_greedy_takes_argmax():
    assert sample_next_token(torch.tensor([0.1, 3.0, 2.0]), SamplingConfig(), None) == 1


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    top_k = {sample_next_token(logits, SamplingConfig(temperature=1.0, top_k=2), generator) for _ in range(200)}
    assert top_k == {0, 1}
    top_p = {sample_next_token(logits, SamplingConfig(temperature=1.0, top_p=0.7), generator) for _ in range(200)}
    assert top_p == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 ≥ 0.7 stops there


def test_seed_makes_sampling_reproducible():
    logits = torch.randn(100)
    draws = [[sample_next_token(logits, SamplingConfig(temperature=1.0), torch.Generator().manual_seed(3))
              for _ in range(5)] for _ in range(2)]
    assert draws[0] == draws[1]


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"temperature": float("nan")}, {"top_k": 0},
                                    {"top_p": 0.0}, {"top_p": 1.5}])
def test_invalid_sampling_values_are_rejected(kwargs):
    with pytest.raises(InputError):
        SamplingConfig(**kwargs)


def test_stream_text_cuts_at_stop_strings_and_holds_partial_characters():
    vocab = {1: "Hel", 2: "lo", 3: " EN", 4: "D more", 5: "\xe2", 6: "\x82\xac"}

    def decode(ids):
        return b"".join(vocab[i].encode("latin-1") for i in ids).decode("utf-8", errors="replace")

    pieces = list(stream_text(iter([1, 2, 3, 4]), decode, frozenset(), stop_strings=["END"]))
    assert "".join(pieces) == "Hello "
    assert all("E" not in piece for piece in pieces)
    euro = list(stream_text(iter([5, 6]), decode, frozenset()))
    assert euro == ["€"]
    assert "".join(stream_text(iter([1, 9, 2]), lambda ids: decode([i for i in ids if i != 9]),
                               frozenset({9}))) == "Hel"


def test_generation_refuses_an_encoder():
    from attnlab.config import ModelConfig
    from attnlab.generate import generate_token_ids
    from attnlab.model import Transformer

    config = ModelConfig(family="bert", vocab_size=50, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8,
                         d_ff=32,
                         context_length=32, causal=False, lm_head=False, positions="learned", norm="layernorm",
                         norm_placement="post", mlp="gelu", activation="gelu")
    with pytest.raises(InputError, match="encoder"):
        next(generate_token_ids(Transformer(config), [1, 2, 3], max_new_tokens=2))


def test_generation_continues_past_the_context_on_its_recent_half():
    """A small trained model (context 16 here) still writes long samples; each token is what a full
    recomputation over the same window gives."""
    from attnlab.config import ModelConfig
    from attnlab.generate import generate_token_ids
    from attnlab.model import Transformer

    torch.manual_seed(0)
    config = ModelConfig(family="gpt2", vocab_size=20, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8,
                         d_ff=32, context_length=16, norm="layernorm", mlp="gelu", positions="learned")
    model = Transformer(config).eval()
    with torch.no_grad():
        model.token_embedding.weight.mul_(20)  # a random model with some preference between tokens
    prompt = [1, 2, 3]
    tokens = list(generate_token_ids(model, prompt, max_new_tokens=40))
    assert len(tokens) == 40
    sequence, window_start = list(prompt), 0
    for token in tokens:
        if len(sequence) - window_start > config.context_length:  # the cache was full: keep the recent half
            window_start = len(sequence) - config.context_length // 2
        with torch.no_grad():
            expected = int(model(torch.tensor([sequence[window_start:]]))[0, -1].argmax())
        assert token == expected
        sequence.append(token)
