"""One tokenizer interface over every tokenizer attnlab meets.

Models come with their tokenizer in different shapes: a ``tokenizer.json`` (HF folders), metadata
inside a GGUF file, tiktoken rank files (GPT-2), or nothing at all (char-level models we train).
Everything else in attnlab talks to :class:`Tokenizer` only, so generation, inspection tables and
checkpoints never care which of these they hold.

GGUF files carry no ``tokenizer.json``; :func:`tokenizer_from_gguf` rebuilds an equivalent
``tokenizers.Tokenizer`` from the vocabulary, merges and flags stored as metadata.
"""

import base64
import hashlib
import importlib.metadata
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import tiktoken
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

from attnlab.errors import TokenizerError
from attnlab.paths import atomic_write_text, cache_dir

# Tokens that end an assistant turn. Chat models stop on these even when the file's eos is another
# token (Gemma's eos is <eos>, but an instruct turn ends with <end_of_turn>).
_END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")

# llama.cpp's token types (gguf.TokenType): CONTROL tokens are special, USER_DEFINED ones are plain
# added tokens; both must be matched whole in the text instead of being cut up by BPE.
_CONTROL = 3
_USER_DEFINED = 4

# GPT-2's pre-tokenizer regex: contractions, letter runs, digit runs, other runs, whitespace.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each byte as a printable character, so BPE tokens are plain strings.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space...) are moved to 256+.
    That is why a space shows up as 'Ġ' (chr(256 + 32)) in byte-level vocabularies.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    moved = (byte for byte in range(256) if byte not in mapping)
    mapping.update({byte: chr(256 + n) for n, byte in enumerate(moved)})
    return mapping


_BYTE_OF_CHAR = {char: byte for byte, char in _bytes_to_unicode().items()}


def _show_bytes(data: bytes) -> str:
    """``data`` as text, each byte that is not part of a whole UTF-8 character written ``<0xNN>``.

    A byte-level token may hold half a character (an emoji is 4 bytes, often 2+ tokens); showing
    the raw byte keeps every token visible instead of collapsing to U+FFFD.
    """
    shown = []
    while data:
        try:
            shown.append(data.decode("utf-8"))
            break
        except UnicodeDecodeError as error:
            shown.append(data[: error.start].decode("utf-8"))
            shown.extend(f"<0x{byte:02X}>" for byte in data[error.start : error.end])
            data = data[error.end :]
    return "".join(shown)


def _raise_exception(message: str) -> None:
    """Chat templates call this to reject a conversation (e.g. roles that do not alternate)."""
    raise TokenizerError(f"chat template: {message}")


def _strftime_now(format: str) -> str:
    """Some templates (Llama 3) write today's date into the system prompt."""
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile once per template: the sandbox stops a template file from touching Python objects."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise TokenizerError(f"chat template does not compile (line {error.lineno}): {error.message}") from error


class Tokenizer(ABC):
    """Text <-> token ids, plus what generation and display need to know about the vocabulary."""

    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    chat_template: str | None = None  # jinja2 source
    stop_ids: frozenset[int] = frozenset()  # generation ends on any of these
    continuing_subword_prefix: str | None = None  # WordPiece's "##": the piece continues the previous word

    @abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) become one id
        each; ``add_special_tokens`` adds what the model expects around a sequence (BOS for Gemma,
        [CLS]..[SEP] for BERT, nothing for SmolLM2)."""

    @abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; with ``skip_special_tokens`` special tokens are left out."""

    @abstractmethod
    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Display text of each token for tables and plots: real characters (no 'Ġ' or '▁'), with
        bytes that are only part of a UTF-8 character shown as ``<0xE2>``."""

    @abstractmethod
    def save(self, folder: Path) -> dict[str, Any]:
        """Write what this tokenizer needs into ``folder`` and return a JSON-able spec for
        :func:`tokenizer_from_spec`."""

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` ({'role', 'content'} dicts), as the model was trained on it.

        The text still holds special tokens as strings (``<|im_start|>``); :meth:`encode` turns them
        into their ids.
        """
        if self.chat_template is None:
            raise TokenizerError(
                "this model has no chat template; use an instruct model (e.g. smollm2-135m-instruct) "
                "or pass the prompt as plain text"
            )
        template = _compile_chat_template(self.chat_template)
        try:
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._special_text(self.bos_id),
                eos_token=self._special_text(self.eos_id),
            )
        except jinja2.TemplateError as error:  # undefined names, sandbox refusals...
            raise TokenizerError(f"chat template failed: {error}") from error

    def is_special(self, token_id: int) -> bool:
        """True for control tokens (``<|im_start|>``, ``[CLS]``, ``<bos>``…): they have no text of their own."""
        return self.decode([token_id]) != "" and self.decode([token_id], skip_special_tokens=True) == ""

    def _special_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.decode([token_id])

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        """``ids`` as plain ints (they may come from a tensor), refusing ids outside the vocabulary."""
        checked = [int(token_id) for token_id in ids]
        for token_id in checked:
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(
                    f"token id {token_id} is outside this tokenizer's vocabulary (0..{self.vocab_size - 1})"
                )
        return checked


def _stop_ids(eos_id: int | None, token_to_id: Callable[[str], int | None]) -> frozenset[int]:
    ids = {token_to_id(token) for token in _END_OF_TURN_TOKENS} | {eos_id}
    return frozenset(token_id for token_id in ids if token_id is not None)


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (the engine behind HF's ``tokenizer.json``) plus the model facts
    that live outside it: bos/eos/pad ids and the chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        chat_template: str | None = None,
        stop_ids: Iterable[int] | None = None,
    ):
        # Some tokenizer.json files (MiniLM's) truncate to 128 tokens and pad: a tokenizer must not
        # drop text silently; the model checks its own context length.
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.chat_template = chat_template
        self.stop_ids = frozenset(stop_ids) if stop_ids is not None else _stop_ids(eos_id, backend.token_to_id)
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        if isinstance(backend.model, models.WordPiece):
            self.continuing_subword_prefix = backend.model.continuing_subword_prefix

    @classmethod
    def from_file(cls, path: Path) -> "HFTokenizer":
        """Load a ``tokenizer.json``, with bos/eos/pad and the chat template from the
        ``tokenizer_config.json`` (or ``chat_template.jinja``) beside it when present."""
        path = Path(path)
        backend = _load_backend(path)
        config_path = path.with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}

        def token_id(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, dict):  # an AddedToken written out as {"content": ...}
                token = token.get("content")
            return backend.token_to_id(token) if isinstance(token, str) else None

        chat_template = config.get("chat_template")
        template_path = path.with_name("chat_template.jinja")
        if chat_template is None and template_path.exists():
            chat_template = template_path.read_text(encoding="utf-8")
        if isinstance(chat_template, list):  # several named templates; the default one is for chat
            chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
        return cls(
            backend,
            bos_id=token_id("bos_token"),
            eos_id=token_id("eos_token"),
            pad_id=token_id("pad_token"),
            chat_template=chat_template,
        )

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(self._checked_ids(ids), skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        tokens = [self.backend.id_to_token(token_id) for token_id in self._checked_ids(ids)]
        if self._byte_level:
            # Characters outside the byte alphabet only occur in added tokens; they stand for themselves.
            return [
                _show_bytes(b"".join(bytes([_BYTE_OF_CHAR[c]]) if c in _BYTE_OF_CHAR else c.encode() for c in t))
                for t in tokens
            ]
        return [_show_piece(token) for token in tokens]

    def save(self, folder: Path) -> dict[str, Any]:
        atomic_write_text(Path(folder) / "tokenizer.json", self.backend.to_str())
        return {
            "kind": "hf",
            "file": "tokenizer.json",
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "chat_template": self.chat_template,
            "stop_ids": sorted(self.stop_ids),
        }


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises plain Exception for missing and malformed files
        raise TokenizerError(f"cannot load tokenizer file {path}: {error}") from error


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _show_piece(token: str) -> str:
    """Display text of a sentencepiece-style token: '▁' is a space, ``<0x41>`` a byte-fallback token.

    A byte-fallback token below 0x80 is a whole ASCII character, so it is shown as that character;
    higher bytes are only part of a character and stay ``<0xNN>``.
    """
    match = _BYTE_FALLBACK.fullmatch(token)
    if match is None:
        return token.replace("\u2581", " ")
    byte = int(match[1], 16)
    return chr(byte) if byte < 0x80 else token


# ---------------------------------------------------------------------------------------------
# GGUF


def _field(reader: Any, key: str, default: Any = ...) -> Any:
    """A GGUF metadata value; a missing key without a default is an error naming the key."""
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise TokenizerError(f"the GGUF file has no {key!r} metadata, so its tokenizer cannot be built")
        return default
    return field.contents()


def tokenizer_from_gguf(reader: Any) -> HFTokenizer:
    """The tokenizer a GGUF file describes in its ``tokenizer.*`` metadata (``reader`` is a
    ``gguf.GGUFReader``). Supports byte-level BPE (``gpt2``: SmolLM2) and sentencepiece-style BPE
    with byte fallback (``llama``: Gemma)."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind == "gpt2":
        backend = _byte_level_backend(reader)
        add_bos_default = False
    elif kind == "llama":
        backend = _cached_backend(reader, _sentencepiece_backend)
        add_bos_default = True  # llama.cpp's default for sentencepiece vocabularies without the flag
    else:
        raise TokenizerError(
            f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE), "
            "'llama' (sentencepiece BPE)"
        )
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id", None)
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id", None)
    backend.post_processor = _bos_eos_processor(
        backend,
        bos_id if _field(reader, "tokenizer.ggml.add_bos_token", add_bos_default) else None,
        eos_id if _field(reader, "tokenizer.ggml.add_eos_token", False) else None,
    )
    return HFTokenizer(
        backend,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=_field(reader, "tokenizer.ggml.padding_token_id", None),
        chat_template=_field(reader, "tokenizer.chat_template", None),
    )


def _bos_eos_processor(
    backend: tokenizers.Tokenizer, bos_id: int | None, eos_id: int | None
) -> processors.PostProcessor | None:
    """The post-processor that wraps each encoded text in BOS/EOS, as the file's flags ask."""
    before = [] if bos_id is None else [bos_id]
    after = [] if eos_id is None else [eos_id]
    if not before and not after:
        return None
    names = {token_id: backend.id_to_token(token_id) for token_id in before + after}
    single = " ".join([*(names[i] for i in before), "$A", *(names[i] for i in after)])
    return processors.TemplateProcessing(single=single, special_tokens=[(n, i) for i, n in names.items()])


def _add_typed_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Make CONTROL tokens special and USER_DEFINED tokens plain added tokens, both matched whole.

    ``tokens`` are the vocabulary's spellings; a user-defined token the vocabulary had to respell
    (Gemma's space runs) is not in it any more and is left to BPE, as transformers does.
    """
    vocab = backend.get_vocab()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == _CONTROL]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types)
            if kind == _USER_DEFINED and t in vocab
        ]
    )


def _byte_level_backend(reader: Any) -> tokenizers.Tokenizer:
    """GPT-2-style byte-level BPE; tokens and merges are stored in the file, already byte-spelled."""
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
    gpt2_split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt2":
        pre_tokenizer = gpt2_split
    elif pre == "smollm":
        # SmolLM2's own tokenizer.json splits every digit off before GPT-2's regex, and llama.cpp's
        # 'smollm' pre-tokenizer does the same. transformers' GGUF converter ignores 'smollm' and
        # keeps ' 2024' as one piece; we follow the real model. The vocabulary has no merges of
        # ASCII digits, so ids differ only around them: '\n\n1' is '\n\n','1' here but
        # '\n','\n','1' there (GPT-2's regex leaves the last space to the next piece), and ' ¹' is
        # two tokens here, one there.
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2_split])
    else:
        raise TokenizerError(f"GGUF byte-level pre-tokenizer {pre!r} is not supported; supported: 'gpt2', 'smollm'")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges")]
    backend = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    _add_typed_tokens(backend, tokens, _field(reader, "tokenizer.ggml.token_type", []))
    return backend


def _sentencepiece_backend(reader: Any) -> tokenizers.Tokenizer:
    """Sentencepiece-style BPE with byte fallback, shaped like Gemma's own ``tokenizer.json``.

    Spaces become '▁' before BPE; a character missing from the vocabulary falls back to its UTF-8
    byte tokens (``<0xE2>``...), so nothing is ever unknown.
    """
    # GGUF stores Gemma's tokens of 2+ spaces as real spaces, while the text BPE sees has '▁'.
    tokens = [
        "\u2581" * len(t) if len(t) > 1 and set(t) == {" "} else t for t in _field(reader, "tokenizer.ggml.tokens")
    ]
    types = _field(reader, "tokenizer.ggml.token_type", [])
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _merges_from_vocab(tokens, types, vocab)
    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id", None)
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab,
            merges,
            unk_token=None if unk_id is None else tokens[unk_id],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    replace_spaces = normalizers.Replace(" ", "\u2581")
    if _field(reader, "tokenizer.ggml.add_space_prefix", False):  # Llama-2 style: text starts with a space
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace_spaces])
    else:
        backend.normalizer = replace_spaces
    # As in Gemma's tokenizer.json. The normalizer has already turned spaces into '▁', so the whole
    # text reaches BPE as one word: a token may span what were words ('▁▁' then 'x', or '.▁').
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    _add_typed_tokens(backend, tokens, types)
    return backend


def _merges_from_vocab(tokens: list[str], types: list[int], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary that lists none: every way to cut a token into two tokens.

    Their priority is the token's position in the file, earliest first. Sentencepiece ranks merges
    by the merged token's score, but Gemma's scores do not follow its merge order while its token
    order does (for Llama-2 the two agree). Within a token, longer left pieces go first.
    CONTROL tokens are never produced by BPE (they are matched whole in the text), so they are skipped.
    """
    merges = []
    for index, token in enumerate(tokens):
        if index < len(types) and types[index] == _CONTROL:
            continue
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


# Bump when the built tokenizer changes, so caches built by an older attnlab are not reused.
_CACHE_VERSION = 1


def _cached_backend(reader: Any, build: Callable[[Any], tokenizers.Tokenizer]) -> tokenizers.Tokenizer:
    """``build(reader)``, kept as JSON under the cache dir: deriving merges for Gemma's 262k tokens
    takes seconds, loading the JSON far less. The key changes when the GGUF file does."""
    path = Path(reader.data.filename).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{_CACHE_VERSION}|{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    cached = cache_dir() / "tokenizers" / f"{key}.json"
    if cached.exists():
        try:
            return tokenizers.Tokenizer.from_file(str(cached))
        except Exception:  # a cache file we cannot read is rebuilt, not fatal
            pass
    backend = build(reader)
    atomic_write_text(cached, backend.to_str())
    return backend


# ---------------------------------------------------------------------------------------------
# tiktoken (GPT-2)


def _read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken ranks file: one ``base64(token) rank`` per line."""
    try:
        text = path.read_text(encoding="ascii")
    except OSError as error:
        raise TokenizerError(f"cannot read tiktoken ranks file {path}: {error}") from error
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class TiktokenTokenizer(Tokenizer):
    """A ``tiktoken`` encoding: byte-level BPE from a ranks file, much faster than ``tokenizers``."""

    def __init__(
        self, name: str, ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int], *, eos_token: str
    ):
        self._name, self._ranks, self._pattern = name, ranks, pattern
        self._special_tokens = dict(special_tokens)
        self._encoding = tiktoken.Encoding(
            name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self._special_tokens
        )
        self.vocab_size = self._encoding.n_vocab
        # GPT-2 has one special token; it ends a document and so also starts the next one.
        self.bos_id = self.eos_id = self._special_tokens[eos_token]
        self.stop_ids = frozenset({self.eos_id})

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """GPT-2 adds nothing around a sequence, so ``add_special_tokens`` changes nothing."""
        return self._encoding.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        ids = self._checked_ids(ids)
        if skip_special_tokens:
            special = set(self._special_tokens.values())
            ids = [token_id for token_id in ids if token_id not in special]
        return self._encoding.decode(ids)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [_show_bytes(self._encoding.decode_single_token_bytes(t)) for t in self._checked_ids(ids)]

    def save(self, folder: Path) -> dict[str, Any]:
        """Copies the ranks into ``folder``, so a checkpoint loads without the package they came from."""
        file = f"{self._name}.tiktoken"
        lines = (f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in self._ranks.items())
        atomic_write_text(Path(folder) / file, "".join(lines))
        eos_token = next(token for token, token_id in self._special_tokens.items() if token_id == self.eos_id)
        return {
            "kind": "tiktoken",
            "name": self._name,
            "file": file,
            "pattern": self._pattern,
            "special_tokens": self._special_tokens,
            "eos_token": eos_token,
        }


def gpt2_tokenizer() -> TiktokenTokenizer:
    """GPT-2's tokenizer, from the ranks file the ``openai-whisper`` package ships.

    tiktoken would download it; whisper carries it, so it works offline. The package is located
    through its metadata, never imported (importing whisper pulls in numba and more).
    """
    try:
        distribution = importlib.metadata.distribution("openai-whisper")
    except importlib.metadata.PackageNotFoundError:
        distribution = None
    path = Path(str(distribution.locate_file("whisper/assets/gpt2.tiktoken"))) if distribution else None
    if path is None or not path.exists():
        raise TokenizerError(
            "GPT-2's tokenizer ranks come from the openai-whisper package; install it with: "
            "pip install --no-deps openai-whisper"
        )
    return TiktokenTokenizer(
        "gpt2", _read_ranks(path), _GPT2_PATTERN, {"<|endoftext|>": 50256}, eos_token="<|endoftext|>"
    )


# ---------------------------------------------------------------------------------------------
# Characters


class CharTokenizer(Tokenizer):
    """One token per character: the tokenizer of the small char-level models attnlab trains."""

    def __init__(self, chars: list[str]):
        if not chars or any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise TokenizerError("a CharTokenizer needs a non-empty list of distinct single characters")
        self.chars = list(chars)
        self._ids = {char: index for index, char in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The sorted distinct characters of ``text``: sorted, so the same text gives the same ids."""
        return cls(sorted(set(text)))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """There are no special tokens, so ``add_special_tokens`` changes nothing."""
        ids = []
        for position, char in enumerate(text):
            token_id = self._ids.get(char)
            if token_id is None:
                raise TokenizerError(
                    f"character {char!r} (position {position}) is not in this tokenizer's "
                    f"{self.vocab_size} characters; build it from text that contains it"
                )
            ids.append(token_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return "".join(self.token_strings(ids))

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self.chars[token_id] for token_id in self._checked_ids(ids)]

    def save(self, folder: Path) -> dict[str, Any]:
        """The characters fit in the spec itself; nothing is written to ``folder``."""
        return {"kind": "char", "chars": self.chars}


def tokenizer_from_spec(folder: Path, spec: dict[str, Any]) -> Tokenizer:
    """The tokenizer that ``Tokenizer.save(folder)`` wrote and described in ``spec``."""
    folder = Path(folder)
    kind = spec.get("kind")
    try:
        if kind == "hf":
            return HFTokenizer(
                _load_backend(folder / spec["file"]),
                bos_id=spec["bos_id"],
                eos_id=spec["eos_id"],
                pad_id=spec["pad_id"],
                chat_template=spec["chat_template"],
                stop_ids=spec["stop_ids"],
            )
        if kind == "tiktoken":
            return TiktokenTokenizer(
                spec["name"],
                _read_ranks(folder / spec["file"]),
                spec["pattern"],
                spec["special_tokens"],
                eos_token=spec["eos_token"],
            )
        if kind == "char":
            return CharTokenizer(spec["chars"])
    except KeyError as error:
        raise TokenizerError(f"tokenizer spec of kind {kind!r} lacks {error}") from error
    raise TokenizerError(f"unknown tokenizer kind {kind!r} in spec; known: 'hf', 'tiktoken', 'char'")
