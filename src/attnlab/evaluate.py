"""Perplexity of a language model on a text, with strided sliding windows.

A text longer than the model's context is scored in windows of ``context`` tokens that advance by
``stride`` (the method of Hugging Face's "Perplexity of fixed-length models" guide). Each window
scores only the tokens no earlier window has scored, and the ``context - stride`` tokens before them
are there as context only. stride == context gives non-overlapping chunks (fast, pessimistic: the
first tokens of each chunk see little context, and without a BOS each chunk's first token, which
sees none, is not scored); stride 1 gives every token a full window (slowest); the default,
context // 2, is the usual compromise.

BOS. Without a beginning-of-sequence token the very first token of the text has nothing to be
predicted from, so it is never scored. ``bos``:

- ``"auto"`` (default): prepend the tokenizer's BOS to every window when the tokenizer adds one
  itself (``tokenizer.encode("a")`` starts with ``bos_id``), as Gemma does: such a model was
  trained with a BOS in front and is out of distribution without it. Otherwise no BOS, as for
  SmolLM2 (its tokenizer adds none) and char-level models (they have none).
- ``"always"``: prepend the BOS (an error if the tokenizer has none).
- ``"never"``: no BOS.

With a BOS, the window's first text token is scored too (predicted from the BOS alone in the
first window). The BOS is an extra position in front of the window, so with a BOS ``context`` may
be at most the model's context - 1.

Bits per byte = total NLL / ln 2 / UTF-8 bytes of the text: a figure that compares across
tokenizers (perplexity per token does not). With ``max_tokens`` only a prefix of the text is
scored, and the bytes are those of that prefix, decoded back from its tokens.
"""

import math
from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from attnlab.errors import InputError
from attnlab.lm import LanguageModel
from attnlab.tokenizer import Tokenizer

BOS_MODES = ("auto", "always", "never")
DEFAULT_CONTEXT = 1024  # longer windows barely lower perplexity and cost quadratic attention
_CUT_MARGIN = 64  # tokens dropped before the cut of a text prefix: a cut word re-tokenizes only locally


@dataclass(frozen=True)
class Window:
    """Text tokens [begin, end) go through the model; tokens [score_from, end) are scored."""

    begin: int
    end: int
    score_from: int


@dataclass(frozen=True)
class Perplexity:
    """The result of :func:`perplexity`; NLL in nats."""

    model: str
    source: str
    tokens: int  # text tokens evaluated (after max_tokens)
    tokens_scored: int
    total_nll: float
    bytes: int  # UTF-8 bytes of the evaluated text
    windows: int
    context: int
    stride: int
    bos: bool

    @property
    def mean_nll(self) -> float:
        return self.total_nll / self.tokens_scored

    @property
    def perplexity(self) -> float:
        """exp(mean NLL per scored token)."""
        return math.exp(self.mean_nll)

    @property
    def bits_per_byte(self) -> float:
        return self.total_nll / math.log(2) / self.bytes

    def to_json(self) -> dict:
        return asdict(self) | {"mean_nll": self.mean_nll, "perplexity": self.perplexity,
                               "bits_per_byte": self.bits_per_byte}


def sliding_windows(n_tokens: int, context: int, stride: int, *, bos: bool) -> list[Window]:
    """The windows that score every token of an ``n_tokens`` text once (all but the first without a BOS)."""
    windows, scored_until = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        # A window's first token has no context before it unless a BOS is there (stride == context).
        windows.append(Window(begin, end, max(scored_until, begin if bos else begin + 1)))
        scored_until = end
        if end == n_tokens:
            break
    return windows


def uses_bos(lm: LanguageModel, bos: str) -> bool:
    """Whether windows get a BOS in front under ``bos`` ("auto", "always", "never"); see the module doc."""
    if bos not in BOS_MODES:
        raise InputError(f"bos must be one of {', '.join(BOS_MODES)}, got {bos!r}")
    bos_id = lm.tokenizer.bos_id
    if bos == "always" and bos_id is None:
        raise InputError(f"{lm.name}'s tokenizer has no BOS token: use bos 'never' or 'auto'")
    if bos == "auto":
        return bos_id is not None and lm.tokenizer.encode("a")[:1] == [bos_id]
    return bos == "always"


def perplexity(lm: LanguageModel, text: str, *, context: int | None = None, stride: int | None = None,
               bos: str = "auto", max_tokens: int | None = None, source: str = "text",
               progress: bool = False) -> Perplexity:
    """Perplexity of ``lm`` on ``text`` with windows of ``context`` tokens advancing by ``stride``.

    context defaults to min(1024, the model's context), stride to context // 2; ``max_tokens`` scores
    only the first tokens of the text; ``source`` names the text in the result; ``progress`` shows a
    progress bar on stderr.
    """
    config = lm.config
    if not config.lm_head or not config.causal:
        raise InputError(f"{lm.name} is an encoder ({config.family}, bidirectional) with no next-token "
                         f"predictions: perplexity needs a causal language model")
    with_bos = uses_bos(lm, bos)
    longest = config.context_length - (1 if with_bos else 0)
    context = min(DEFAULT_CONTEXT, longest) if context is None else context
    if not 2 <= context <= longest:
        raise InputError(f"context must be between 2 and {longest} tokens ({lm.name}'s context of "
                         f"{config.context_length}{' less the BOS' if with_bos else ''}), got {context}")
    stride = max(1, context // 2) if stride is None else stride
    if not 1 <= stride <= context:
        raise InputError(f"stride must be between 1 and the context ({context}), got {stride}")
    if max_tokens is not None and max_tokens < 1:
        raise InputError(f"max tokens must be ≥ 1, got {max_tokens}")

    ids = _encode_prefix(lm.tokenizer, text, max_tokens)
    n_bytes = len(text.encode("utf-8"))
    if max_tokens is not None and len(ids) == max_tokens:  # a prefix: the bytes of what is scored
        n_bytes = len(lm.tokenizer.decode(ids).encode("utf-8"))
    needed = 1 if with_bos else 2
    if len(ids) < needed:
        raise InputError(f"the text is {len(ids)} token(s): perplexity needs at least {needed}"
                         + ("" if with_bos else " (without a BOS the first token is only context)"))

    windows = sliding_windows(len(ids), context, stride, bos=with_bos)
    prefix = [lm.tokenizer.bos_id] if with_bos else []
    total_nll = _score_windows(lm, ids, windows, prefix, progress)
    return Perplexity(model=lm.name, source=source, tokens=len(ids),
                      tokens_scored=sum(w.end - w.score_from for w in windows), total_nll=total_nll,
                      bytes=n_bytes, windows=len(windows), context=context, stride=stride, bos=with_bos)


def _encode_prefix(tokenizer: Tokenizer, text: str, max_tokens: int | None) -> list[int]:
    """The first ``max_tokens`` token ids of ``text`` (all without it), with no special tokens.

    With a limit, growing prefixes of the text are encoded and the tokens near the cut dropped
    (only they can differ from encoding the whole text), so that scoring 4,096 tokens of a 12 MB
    corpus does not first tokenize all of it.
    """
    if max_tokens is None:
        return tokenizer.encode(text, add_special_tokens=False)
    chars = 8 * (max_tokens + _CUT_MARGIN)
    while True:
        ids = tokenizer.encode(text[:chars], add_special_tokens=False)
        if chars >= len(text):
            return ids[:max_tokens]
        if len(ids) >= max_tokens + _CUT_MARGIN:
            return ids[:max_tokens]
        chars *= 2


@torch.inference_mode()
def _score_windows(lm: LanguageModel, ids: list[int], windows: list[Window], prefix: list[int],
                   progress: bool) -> float:
    """Summed NLL (nats) of the scored tokens of every window."""
    device = lm.model.device
    total = 0.0
    console = Console(stderr=True)
    columns = (TextColumn("scoring windows"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    # Only on a terminal: piped into a file, a progress display would leave a stray blank line there.
    with Progress(*columns, console=console, transient=True, disable=not (progress and console.is_terminal)) as bar:
        for window in bar.track(windows):
            inputs = torch.tensor([prefix + ids[window.begin:window.end]], device=device)
            n_scored = window.end - window.score_from
            # Only the positions that predict scored tokens go through the vocabulary softmax.
            logits = lm.model(inputs, last_position_only=False)[0, -n_scored - 1:-1]  # (n_scored, vocab)
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            targets = inputs[0, -n_scored:]
            total -= log_probs.gather(1, targets[:, None]).double().sum().item()
    return total
