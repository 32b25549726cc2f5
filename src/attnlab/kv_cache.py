"""A preallocated key/value cache for incremental decoding."""

import torch


class KVCache:
    """Keys and values of every layer, written in place as tokens arrive.

    One buffer of shape (layers, B, n_kv_heads, capacity, head_dim) for k and one for v, filled by
    index assignment (no torch.cat per step, so no reallocation). Attention reads only the filled
    prefix ``[:length]``: its cost grows with the tokens seen, not with the capacity.

    Keys may have another shape than values (``key_heads``, ``key_dim``): the merged-QK variant keys
    on the input x itself, one d_model-wide key shared by every head.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *,
                 key_heads: int | None = None, key_dim: int | None = None) -> None:
        key_shape = (n_layers, batch_size, key_heads or n_kv_heads, capacity, key_dim or head_dim)
        self.keys = torch.zeros(key_shape, dtype=dtype, device=device)
        self.values = torch.zeros((n_layers, batch_size, n_kv_heads, capacity, head_dim), dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0  # tokens stored so far (the same for every layer once a forward pass ends)

    @classmethod
    def over(cls, keys: torch.Tensor, values: torch.Tensor, length: int) -> "KVCache":
        """A cache over existing buffers whose first ``length`` slots are filled (the exported decode step's view)."""
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.capacity, cache.length = keys, values, keys.shape[3], length
        return cache

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_heads, T, hd) after the filled prefix; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} tokens for a capacity of {self.capacity}")
        # Written by index tensors into the whole buffer, not by slice assignment into one layer's view: the
        # same in eager mode (~10 µs more per layer), but the form a compiled graph writes in place. A compiled
        # write into a view of the buffer copies the whole buffer, every layer, every step (5-10× slower decode).
        layer_index = torch.full((1,), layer, dtype=torch.long, device=k.device)
        slots = torch.arange(start, end, device=k.device)
        self.keys[layer_index, :, :, slots] = k.permute(2, 0, 1, 3)  # indexed dims come first: (T, B, H_kv, hd)
        self.values[layer_index, :, :, slots] = v.permute(2, 0, 1, 3)
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n_tokens: int) -> None:
        """Called once per forward pass, after every layer has stored its n_tokens new entries."""
        self.length += n_tokens
