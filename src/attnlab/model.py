"""The Transformer: embeddings → N blocks (norm → attention → norm → MLP) → norm → logits.

One class serves GPT-2, Llama/SmolLM2, Qwen3, Gemma-3 (decoders) and BERT (encoder); the
ModelConfig says which parts to use. Attention itself lives in ``attention.py``.
"""

import torch
from torch import nn

from attnlab.attention import AttentionMask
from attnlab.capture import Capture
from attnlab.config import ModelConfig
from attnlab.kv_cache import KVCache
from attnlab.layers import make_mlp, make_norm
from attnlab.positions import RotaryEmbedding
from attnlab.variants import make_attention


class Block(nn.Module):
    """One transformer layer: attention then MLP, each wrapped in a residual connection.

    pre-norm (GPT-2, Llama):   x = x + Attn(Norm(x));        x = x + MLP(Norm(x))
    post-norm (BERT):          x = Norm(x + Attn(x));        x = Norm(x + MLP(x))
    sandwich (Gemma-3):        x = x + Norm(Attn(Norm(x)));  x = x + Norm(MLP(Norm(x)))
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.placement = config.norm_placement
        self.attention_norm = make_norm(config)
        self.attention = make_attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config)
        if self.placement == "sandwich":
            self.post_attention_norm = make_norm(config)
            self.post_mlp_norm = make_norm(config)

    def forward(self, x: torch.Tensor, mask: AttentionMask, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv_cache: KVCache | None, capture: Capture | None) -> torch.Tensor:
        if self.placement == "post":
            x = self.attention_norm(x + self.attention(x, mask, rope, kv_cache, capture))
            return self.mlp_norm(x + self.mlp(x))
        attended = self.attention(self.attention_norm(x), mask, rope, kv_cache, capture)
        if self.placement == "sandwich":
            x = x + self.post_attention_norm(attended)
            return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))
        x = x + attended
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A decoder (causal) or encoder (bidirectional) transformer built from a ModelConfig."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.position_embedding = nn.Embedding(config.context_length, config.d_model)
        if config.type_vocab_size:
            self.token_type_embedding = nn.Embedding(config.type_vocab_size, config.d_model)
        if config.embedding_norm:
            self.embedding_norm = make_norm(config)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
        # (rope table, mask) kind of each layer, worked out once rather than at every decode step
        self.layer_kinds = [(config.layer_type(layer), config.mask_type(layer)) for layer in range(config.n_layers)]
        self.local_window = config.local_window
        if config.final_norm:
            self.final_norm = make_norm(config)
        if config.lm_head and not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.quantised_head: nn.Module | None = None  # set by attnlab.fast: the LM head in 8 or 4 bits
        if config.positions == "rope":
            self.rope_global = RotaryEmbedding(config.head_dim, config.rope_theta)
            self.rope_local = RotaryEmbedding(config.head_dim, config.rope_theta_local or config.rope_theta)

    def new_kv_cache(self, batch_size: int, capacity: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> KVCache:
        """An empty KV cache shaped for this model's attention (a variant may key on other shapes)."""
        attention = self.blocks[0].attention
        return KVCache(self.config.n_layers, batch_size, self.config.n_kv_heads, capacity, self.config.head_dim,
                       dtype, device, key_heads=attention.key_heads, key_dim=attention.key_dim)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The residual stream's dtype: that of the norms, which stay fp32 in every inference mode."""
        return self.blocks[0].attention_norm.weight.dtype

    def output_weight(self) -> torch.Tensor:
        """The (vocab, d) unembedding matrix: the token embedding itself when tied."""
        return self.token_embedding.weight if self.config.tie_embeddings else self.lm_head.weight

    def forward(self, ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                capture: Capture | None = None, return_hidden: bool = False,
                last_position_only: bool = False, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) → logits (B, T, vocab), or the final hidden states (B, T, d) if asked/encoder.

        attention_mask (B, T_total): 1 for real tokens, 0 for padding (keys no one may attend to).
        With a kv_cache, ids are the *new* tokens; their positions continue after the cached ones.
        position_ids (B, T): each token's position in its own row, for RoPE / learned positions, where
        it is not its slot (a left-padded batch: a row's first real token is at position 0). The
        mask still compares slots, which orders real tokens the same way.
        last_position_only: project only the last position to the vocabulary (all generation needs;
        for a 512-token prompt it skips a 512 × d × vocab matmul).
        """
        config = self.config
        B, T = ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > config.context_length:
            raise ValueError(f"{start + T} tokens exceed the context length {config.context_length}")
        slots = torch.arange(start, start + T, device=ids.device)
        if position_ids is not None and position_ids.shape != ids.shape:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} must have the shape of ids {tuple(ids.shape)}")
        positions = slots if position_ids is None else position_ids  # (T,) shared by the batch, or (B, T)

        x = self.token_embedding(ids)  # (B, T, d)
        if config.embedding_scale is not None:
            x = x * torch.tensor(config.embedding_scale, dtype=x.dtype)
        if config.positions == "learned":
            x = x + self.position_embedding(positions)
        if config.type_vocab_size:
            types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids
            x = x + self.token_type_embedding(types)
        if config.embedding_norm:
            x = self.embedding_norm(x)

        masks = self._masks(slots, start + T, attention_mask)
        ropes = self._rope_tables(positions)
        for block, (rope_kind, mask_kind) in zip(self.blocks, self.layer_kinds):
            x = block(x, masks[mask_kind], ropes[rope_kind] if ropes else None, kv_cache, capture)
        if kv_cache is not None:
            kv_cache.advance(T)

        if last_position_only:
            x = x[:, -1:]
        if config.final_norm:
            x = self.final_norm(x)
        if return_hidden or not config.lm_head:
            return x
        if self.quantised_head is not None:
            logits = self.quantised_head(x)
        else:
            logits = x @ self.output_weight().T  # (B, T, vocab)
        if config.final_logit_softcap is not None:
            logits = config.final_logit_softcap * torch.tanh(logits / config.final_logit_softcap)
        return logits

    def _masks(self, query_positions: torch.Tensor, n_keys: int,
               attention_mask: torch.Tensor | None) -> dict[str, AttentionMask]:
        """One mask per layer kind ("global", "local"), shared by all layers of that kind."""
        config = self.config
        window = self.local_window
        if window is not None and config.causal and n_keys <= window:
            window = None  # every key is inside the window: the local mask is the global one
        last = n_keys - 1  # the queries are the newest tokens
        return {
            "global": AttentionMask(query_positions, n_keys, causal=config.causal, key_padding=attention_mask,
                                    last_query_position=last),
            "local": AttentionMask(query_positions, n_keys, causal=config.causal, sliding_window=window,
                                   key_padding=attention_mask, last_query_position=last),
        }

    def _rope_tables(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """cos/sin tables (T, hd) for positions (T,); for per-row positions (B, T), (B, 1, T, hd) ones."""
        if self.config.positions != "rope":
            return None
        tables = {"global": self.rope_global.cos_sin(positions.reshape(-1)),
                  "local": self.rope_local.cos_sin(positions.reshape(-1))}
        if positions.dim() == 2:  # one table per row, broadcast over the heads
            B, T = positions.shape
            tables = {kind: (cos.view(B, 1, T, -1), sin.view(B, 1, T, -1)) for kind, (cos, sin) in tables.items()}
        return tables


def rebuild_rope_tables(model: Transformer) -> None:
    """Recreate the RoPE frequency buffers (not saved with the weights) of a model built on the meta device."""
    config = model.config
    if config.positions == "rope":
        model.rope_global = RotaryEmbedding(config.head_dim, config.rope_theta)
        model.rope_local = RotaryEmbedding(config.head_dim, config.rope_theta_local or config.rope_theta)
