"""AttentionMap: the attention probabilities of every layer and head for one input, with its tokens.

The probabilities come from the model's own forward pass (capture point ``probs`` in
``attention.py``), so what is shown is exactly what the model computed.

Words. Sub-word tokens are grouped into words by this rule, applied token by token:
a token starts a new word if it is the first token, is a special token (``<|im_start|>``,
``[CLS]``) or follows one, begins with whitespace, is punctuation only (no letter or digit) or
follows such a token, or — for WordPiece vocabularies (BERT) — does not begin with the ``##``
continuation mark. Otherwise it continues the previous word (``" tired"`` + ``"ly"``).

Word-level weights: the weight a query word gives a key word is the **sum** over the key's
pieces (attention paid to any piece is paid to the word) of the **mean** over the query's
pieces (each piece of the query is an equal voice). Rows of the word matrix still sum to 1.
"""

from dataclasses import dataclass, field, replace

import torch

from attnlab.tokenizer import Tokenizer


def group_words(tokenizer: Tokenizer, ids: list[int], tokens: list[str]) -> tuple[list[str], list[int]]:
    """(word texts, word index of each token) by the rule in the module docstring."""
    prefix = tokenizer.continuing_subword_prefix
    words: list[str] = []
    word_of_token: list[int] = []
    previous_breaks = True  # the previous token was special or punctuation: the next one starts a word
    for token_id, text in zip(ids, tokens):
        special = tokenizer.is_special(token_id)
        punctuation = bool(text.strip()) and not any(c.isalnum() for c in text)
        if prefix is not None:
            continues = text.startswith(prefix)
            piece = text[len(prefix):] if continues else text
        else:
            continues = not text[:1].isspace()
            piece = text
        starts = previous_breaks or special or punctuation or not continues or not words
        if starts:
            words.append(piece.strip() if not special else text)
        else:
            words[-1] += piece
        word_of_token.append(len(words) - 1)
        previous_breaks = special or punctuation
    return words, word_of_token


@dataclass(frozen=True)
class AttentionMap:
    """Attention probabilities ``probs`` (layers, heads, T, T): row = query token, column = key token.

    ``layers`` and ``heads`` name the model layers and query heads held (all unless fewer were
    asked for); ``sink_removed`` is True for a map made by :meth:`without_sink`.
    """

    model: str
    text: str
    token_ids: list[int]
    tokens: list[str]  # display text of each token
    words: list[str]
    word_of_token: list[int]
    layers: list[int]
    heads: list[int]
    probs: torch.Tensor
    n_query_heads: int  # of the model (heads may hold fewer)
    n_kv_heads: int
    causal: bool
    sink_removed: bool = False
    notes: list[str] = field(default_factory=list)

    def layer_index(self, layer: int) -> int:
        """Position of model layer ``layer`` along the first axis of ``probs``."""
        return self.layers.index(layer)

    def head_index(self, head: int) -> int:
        """Position of query head ``head`` along the second axis of ``probs``."""
        return self.heads.index(head)

    def kv_head_of(self, head: int) -> int:
        """The key/value head query head ``head`` shares (grouped-query attention): head ÷ (H / H_kv)."""
        return head // (self.n_query_heads // self.n_kv_heads)

    def tokens_of_word(self, word: int) -> list[int]:
        return [t for t, w in enumerate(self.word_of_token) if w == word]

    def word_probs(self) -> torch.Tensor:
        """(layers, heads, W, W): key pieces summed, query pieces averaged (module docstring)."""
        n_words = len(self.words)
        membership = torch.zeros(len(self.tokens), n_words)  # (T, W): 1 where token t belongs to word w
        membership[torch.arange(len(self.tokens)), torch.tensor(self.word_of_token)] = 1.0
        summed_keys = self.probs @ membership  # (L, H, T, W)
        query_mean = membership / membership.sum(0, keepdim=True)  # (T, W): averaging weights per word
        return torch.einsum("tw,lhtv->lhwv", query_mean, summed_keys)

    def without_sink(self) -> "AttentionMap":
        """The map with the first token's weight set to 0 and each row renormalised to sum to 1.

        Many heads park most of their weight on the first token (an "attention sink") when nothing
        else is relevant; setting it aside shows how the rest is shared. A row whose only weight was
        on the first token (the first token's own row, in a decoder) becomes all zeros.
        """
        probs = self.probs.clone()
        probs[..., 0] = 0.0
        mass = probs.sum(-1, keepdim=True)
        probs = torch.where(mass > 0, probs / mass.clamp_min(1e-30), probs)
        note = f"first token {self.tokens[0]!r} (attention sink) set aside; rows renormalised"
        return replace(self, probs=probs, sink_removed=True, notes=[*self.notes, note])

    def to_json(self, decimals: int = 6) -> dict:
        """Tokens, words and the full probability tensor as plain JSON data (rounded)."""
        return {
            "model": self.model,
            "text": self.text,
            "token_ids": self.token_ids,
            "tokens": self.tokens,
            "words": self.words,
            "word_of_token": self.word_of_token,
            "layers": self.layers,
            "heads": self.heads,
            "n_query_heads": self.n_query_heads,
            "n_kv_heads": self.n_kv_heads,
            "causal": self.causal,
            "sink_removed": self.sink_removed,
            "notes": self.notes,
            "probs_axes": ["layer", "head", "query", "key"],
            "probs": self.probs.double().round(decimals=decimals).tolist(),
        }
