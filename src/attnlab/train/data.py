"""Training data: a corpus tokenised once into a memory-mapped token file, split, and sampled.

* Tokenising 5 M characters takes seconds, so the ids are cached in ``cache_dir()/tokens/``
  under a hash of the text and the tokenizer: the second run starts at once.
* Split: the first ``1 − val_fraction`` of the tokens train, the rest validate (fixed).
* Sampling: the batch of optimizer step s, micro-batch m is drawn from a generator seeded with
  (seed, s, m) alone. No sampler state exists, so a resumed run — or a run split over several
  processes, each taking its rows of the same batch — sees exactly the same data.
"""

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from attnlab.errors import InputError
from attnlab.paths import atomic_write_bytes, atomic_write_text, cache_dir
from attnlab.tokenizer import CharTokenizer, Tokenizer, gpt2_tokenizer

SPLITS = {"train": 0, "val": 1}


def build_tokenizer(name: str, text: str) -> Tokenizer:
    """"char" (the corpus's own characters), "gpt2" (GPT-2 BPE), or a pretrained model's tokenizer."""
    if name == "char":
        return CharTokenizer.from_text(text)
    if name == "gpt2":
        return gpt2_tokenizer()
    import attnlab

    try:
        return attnlab.load(name).tokenizer
    except InputError:
        raise
    except Exception as error:  # a missing model says which; anything else is not a tokenizer we know
        raise InputError(f"data.tokenizer {name!r}: expected char, gpt2 or a model name ({error})") from None


def _token_cache(text: str, tokenizer: Tokenizer, tokenizer_name: str) -> np.ndarray:
    """The ids of ``text``, from the cache when this text and tokenizer were seen before."""
    identity = json.dumps({"tokenizer": tokenizer_name, "vocab": tokenizer.vocab_size,
                           "chars": getattr(tokenizer, "chars", None)}, sort_keys=True)
    key = hashlib.sha256(text.encode("utf-8") + b"\0" + identity.encode()).hexdigest()[:32]
    folder = cache_dir() / "tokens"
    ids_path, meta_path = folder / f"{key}.bin", folder / f"{key}.json"
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    if meta_path.is_file() and ids_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("count") == ids_path.stat().st_size // np.dtype(meta["dtype"]).itemsize:
            return np.memmap(ids_path, dtype=meta["dtype"], mode="r")
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=dtype)
    atomic_write_bytes(ids_path, ids.tobytes())
    atomic_write_text(meta_path, json.dumps({"count": len(ids), "dtype": np.dtype(dtype).name}))
    return np.memmap(ids_path, dtype=dtype, mode="r")


@dataclass
class TokenData:
    """The train and val token arrays of one corpus, and the batches drawn from them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    context: int
    seed: int

    @classmethod
    def prepare(cls, text: str, tokenizer_name: str, context: int, val_fraction: float, seed: int,
                source: str) -> "TokenData":
        tokenizer = build_tokenizer(tokenizer_name, text)
        ids = _token_cache(text, tokenizer, tokenizer_name)
        split = int(len(ids) * (1 - val_fraction))
        data = cls(ids[:split], ids[split:], tokenizer, context, seed)
        for name, part in (("train", data.train), ("val", data.val)):
            if len(part) <= context:
                raise InputError(f"corpus {source!r} has {len(ids)} tokens: its {name} split ({len(part)}) is "
                                 f"shorter than one context window + 1 ({context + 1}); use a larger corpus "
                                 f"or a smaller data.context")
        return data

    def batch(self, split: str, step: int, micro_step: int, batch_size: int, rows: slice = slice(None)
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (rows of batch_size, context): targets are inputs shifted by one.

        ``rows`` picks this process's share of the batch (``slice(rank, None, world_size)``).
        """
        return self._windows(split, [self.seed, SPLITS[split], 0, step, micro_step], batch_size, rows)

    def eval_batch(self, split: str, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The index-th evaluation batch: the same batches at every evaluation, so curves compare."""
        return self._windows(split, [self.seed, SPLITS[split], 1, index], batch_size, slice(None))

    def _windows(self, split: str, entropy: list[int], batch_size: int, rows: slice
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.train if split == "train" else self.val
        starts = np.random.default_rng(entropy).integers(0, len(tokens) - self.context, size=batch_size)[rows]
        windows = torch.from_numpy(np.stack([tokens[s:s + self.context + 1] for s in starts]).astype(np.int64))
        return windows[:, :-1], windows[:, 1:]
