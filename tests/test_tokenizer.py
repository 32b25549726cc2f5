"""Tokenizers against transformers (the oracle) on real models, plus small self-contained cases.

Oracle comparisons skip when a model package or transformers is missing; everything built from a
tiny GGUF written here runs everywhere.
"""

import importlib.metadata
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere: no hub in tests

import gguf
import pytest

from attnlab.errors import ModelNotFoundError, TokenizerError
from attnlab.tokenizer import (
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    gpt2_tokenizer,
    tokenizer_from_gguf,
    tokenizer_from_spec,
)
from attnlab.weights.registry import resolve_named_model

# Each string makes a different part of a tokenizer work: words, accents and CJK outside the
# vocabulary (byte fallback / partial bytes), emoji, whitespace runs, leading/trailing spaces.
TEXTS = [
    "Hello world",
    "The cat sat on the mat because it was tired.",
    "café naïve résumé, Ünïcödé",
    "中文字符 and 日本語",
    "emoji 🙂 here 👍🏽",
    "a  b",
    "\n\n",
    "\t x",
    "   leading spaces",
    "trailing spaces   ",
    " ",
    "",
    "I'm  here\n\n\n  ok\r\n",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _model_path(name: str):
    try:
        return resolve_named_model(name)
    except ModelNotFoundError as error:
        pytest.skip(str(error))


def _transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smollm_path():
    return _model_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm(smollm_path) -> Tokenizer:
    return tokenizer_from_gguf(gguf.GGUFReader(smollm_path))


@pytest.fixture(scope="module")
def smollm_oracle(smollm_path):
    return _transformers().AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


@pytest.fixture(scope="module")
def minilm_folder():
    return _model_path("minilm-l6")


@pytest.fixture(scope="module")
def minilm(minilm_folder) -> Tokenizer:
    return HFTokenizer.from_file(minilm_folder / "tokenizer.json")


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    try:
        return gpt2_tokenizer()
    except TokenizerError as error:
        pytest.skip(str(error))


# ---------------------------------------------------------------------------------------------
# SmolLM2 (byte-level BPE from GGUF)


@pytest.mark.parametrize("text", TEXTS + ["<|im_start|>user\nhi<|im_end|>", "<|endoftext|><repo_name>x"])
def test_smollm2_matches_transformers_on_digit_free_text(smollm, smollm_oracle, text):
    assert smollm.encode(text) == smollm_oracle(text).input_ids
    assert smollm.encode(text, add_special_tokens=False) == smollm_oracle(text, add_special_tokens=False).input_ids


def test_smollm2_splits_every_digit_like_the_real_model(smollm):
    # SmolLM2's tokenizer.json and llama.cpp's 'smollm' pre-tokenizer isolate each digit; transformers'
    # GGUF converter does not (it gives '\n','\n','1' and a single ' ¹'), so these are checked directly.
    assert smollm.token_strings(smollm.encode("2024")) == ["2", "0", "2", "4"]
    assert smollm.token_strings(smollm.encode("in 2024!")) == ["in", " ", "2", "0", "2", "4", "!"]
    assert smollm.token_strings(smollm.encode("\n\n1.")) == ["\n\n", "1", "."]
    assert smollm.token_strings(smollm.encode(" ¹²")) == [" ", "¹", "²"]


def test_smollm2_special_tokens_and_ids(smollm):
    ids = smollm.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == smollm.bos_id == 1 and ids[-1] == smollm.eos_id == 2
    assert smollm.encode("hi") == smollm.encode("hi", add_special_tokens=False)  # no BOS for SmolLM2
    assert smollm.vocab_size == 49152 and smollm.pad_id == 2 and smollm.eos_id in smollm.stop_ids
    assert smollm.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("text", TEXTS + ["2024-11-23: 3.14159", "<|im_start|>assistant\n"])
def test_smollm2_decode_round_trip(smollm, text):
    assert smollm.decode(smollm.encode(text)) == text


def test_smollm2_token_strings_show_characters_and_partial_bytes(smollm):
    text = "The cat 🙂 sat"
    strings = smollm.token_strings(smollm.encode(text))
    assert "".join(strings) == text and "Ġ" not in "".join(strings)
    # '符' is 3 UTF-8 bytes that SmolLM2 cuts 2 + 1: neither token is a whole character.
    assert smollm.token_strings(smollm.encode("符")) == ["<0xE7><0xAC>", "<0xA6>"]


def test_smollm2_chat_template_matches_transformers(smollm, smollm_oracle):
    prompt = smollm.render_chat(CHAT)
    assert prompt == smollm_oracle.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert len(smollm.encode(prompt)) == 37
    assert not smollm.render_chat(CHAT, add_generation_prompt=False).endswith("assistant\n")


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (BERT WordPiece from tokenizer.json)


@pytest.fixture(scope="module")
def minilm_oracle(minilm_folder):
    return _transformers().AutoTokenizer.from_pretrained(minilm_folder)


@pytest.mark.parametrize("text", TEXTS + ["[CLS] already [SEP]", "word " * 300])
def test_minilm_matches_transformers(minilm, minilm_oracle, text):
    assert minilm.encode(text) == minilm_oracle(text).input_ids  # also: no truncation at 128/512 tokens


def test_minilm_adds_cls_and_sep(minilm):
    ids = minilm.encode("Hello world")
    assert ids[0] == 101 and ids[-1] == 102
    assert minilm.encode("Hello world", add_special_tokens=False) == ids[1:-1]
    assert minilm.decode(ids, skip_special_tokens=True) == "hello world"
    assert minilm.token_strings(ids) == ["[CLS]", "hello", "world", "[SEP]"]
    assert minilm.pad_id == 0 and minilm.chat_template is None


# ---------------------------------------------------------------------------------------------
# GPT-2 (tiktoken) and characters


def test_gpt2_known_ids_and_round_trip(gpt2):
    assert gpt2.encode("The cat") == [464, 3797]
    assert gpt2.encode("hi<|endoftext|>") == [5303, 50256]
    assert gpt2.eos_id == 50256 and gpt2.vocab_size == 50257 and gpt2.stop_ids == {50256}
    for text in TEXTS:
        assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.decode([5303, 50256], skip_special_tokens=True) == "hi"
    # '文' is 3 UTF-8 bytes, each its own token here (the first joined to the space).
    assert gpt2.token_strings(gpt2.encode(" 🙂 文")) == [" 🙂", " <0xE6>", "<0x96>", "<0x87>"]


def test_gpt2_without_whisper_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(TokenizerError, match="pip install --no-deps openai-whisper"):
        gpt2_tokenizer()


def test_char_tokenizer_round_trip_and_unknown_char():
    chars = CharTokenizer.from_text("hello world")
    assert chars.chars == [" ", "d", "e", "h", "l", "o", "r", "w"] and chars.vocab_size == 8
    assert chars.decode(chars.encode("hello world")) == "hello world"
    with pytest.raises(TokenizerError, match="'z'"):
        chars.encode("hez")
    with pytest.raises(TokenizerError, match="outside"):
        chars.decode([8])
    with pytest.raises(TokenizerError, match="no chat template"):
        chars.render_chat(CHAT)


# ---------------------------------------------------------------------------------------------
# Chat templates


def test_chat_template_sandbox_globals_and_errors():
    tokenizer = CharTokenizer.from_text("abc")
    tokenizer.chat_template = (
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'user' %}\n"
        "{{ m['role'] }}:{{ m['content'] }};\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}{{ strftime_now('%Y')|length }}{% endif %}"
    )
    # trim_blocks/lstrip_blocks: the indentation and newlines around {% %} tags vanish.
    assert tokenizer.render_chat([{"role": "user", "content": "a"}]) == "user:a;\n4"

    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TokenizerError, match="roles must alternate"):
        tokenizer.render_chat(CHAT)
    tokenizer.chat_template = "{{ ''.__class__.__mro__ }}"
    with pytest.raises(TokenizerError, match="unsafe"):  # the sandbox refuses Python internals
        tokenizer.render_chat(CHAT)
    tokenizer.chat_template = "{% for %}"
    with pytest.raises(TokenizerError, match="does not compile"):
        tokenizer.render_chat(CHAT)


# ---------------------------------------------------------------------------------------------
# Save / load


def _assert_same_tokenizer(a: Tokenizer, b: Tokenizer, texts: list[str]) -> None:
    for name in ("vocab_size", "bos_id", "eos_id", "pad_id", "chat_template", "stop_ids"):
        assert getattr(a, name) == getattr(b, name), name
    for text in texts:
        ids = a.encode(text)
        assert b.encode(text) == ids
        assert b.decode(ids) == a.decode(ids) and b.token_strings(ids) == a.token_strings(ids)


@pytest.mark.parametrize("name", ["smollm", "minilm", "gpt2"])
def test_spec_round_trip(name, request, tmp_path):
    tokenizer = request.getfixturevalue(name)
    spec = tokenizer.save(tmp_path)
    loaded = tokenizer_from_spec(tmp_path, spec)
    assert type(loaded) is type(tokenizer)
    _assert_same_tokenizer(tokenizer, loaded, TEXTS + ["<|im_start|>x<|im_end|>", "2024"])


def test_char_spec_round_trip(tmp_path):
    chars = CharTokenizer.from_text("to be or not")
    _assert_same_tokenizer(chars, tokenizer_from_spec(tmp_path, chars.save(tmp_path)), ["not to be"])


def test_bad_spec_is_a_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match="unknown tokenizer kind"):
        tokenizer_from_spec(tmp_path, {"kind": "nope"})
    with pytest.raises(TokenizerError, match="lacks"):
        tokenizer_from_spec(tmp_path, {"kind": "char"})
    with pytest.raises(TokenizerError, match="cannot load"):
        tokenizer_from_spec(tmp_path, {"kind": "hf", "file": "missing.json"})


# ---------------------------------------------------------------------------------------------
# Sentencepiece-style GGUF, built from a tiny file written here


def _write_gguf(path, model, tokens=(), types=(), scores=None):
    writer = gguf.GGUFWriter(path, arch="gemma3")
    writer.add_tokenizer_model(model)
    if tokens:
        writer.add_token_list(list(tokens))
        writer.add_token_types(list(types))
        writer.add_token_scores(scores or [0.0] * len(tokens))
        writer.add_bos_token_id(2)
        writer.add_eos_token_id(1)
        writer.add_unk_token_id(3)
        writer.add_pad_token_id(0)
        writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path)


# "bc" comes before "ab" in the file, but "ab" has the better score: a merge order taken from the
# scores would encode "abc" as ab|c. "  " is a space run stored with real spaces, as Gemma does.
TINY = [
    ("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<end_of_turn>", 3), ("<0xC3>", 6), ("<0xA9>", 6),
    ("▁", 1), ("a", 1), ("b", 1), ("c", 1), ("bc", 1), ("ab", 1), ("  ", 4), ("▁a", 1), ("x", 1),
]  # fmt: skip


def test_sentencepiece_gguf_merges_bytes_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    tokens, types = zip(*TINY)
    scores = [10.0 if token == "ab" else 0.0 for token in tokens]
    tokenizer = tokenizer_from_gguf(_write_gguf(tmp_path / "tiny.gguf", "llama", tokens, types, scores))

    def pieces(text):
        return tokenizer.token_strings(tokenizer.encode(text))

    assert pieces("abc") == ["<bos>", "a", "bc"]  # merge order = token order in the file
    assert pieces("a  b") == ["<bos>", "a", "  ", "b"]  # the space run, respelled '▁▁', is one token
    assert tokenizer.encode("\u2581\u2581", add_special_tokens=False) == [13]  # BPE knows it as '▁▁'
    assert pieces(" a") == ["<bos>", " a"]
    assert pieces("é") == ["<bos>", "<0xC3>", "<0xA9>"]  # byte fallback
    assert pieces("qq") == ["<bos>", "<unk>"]  # no byte tokens for 'q': one fused unknown
    assert pieces("x<end_of_turn>") == ["<bos>", "x", "<end_of_turn>"]
    assert tokenizer.decode(tokenizer.encode("é a  b"), skip_special_tokens=True) == "é a  b"
    assert tokenizer.encode("x", add_special_tokens=False) == [15]
    assert tokenizer.stop_ids == {1, 4} and (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (2, 1, 0)

    [cached] = (tmp_path / "cache" / "tokenizers").iterdir()
    cached.write_text("not json")  # a broken cache is rebuilt, not fatal
    again = tokenizer_from_gguf(gguf.GGUFReader(tmp_path / "tiny.gguf"))
    assert again.encode("abc") == tokenizer.encode("abc")
    assert tokenizer_from_gguf(gguf.GGUFReader(tmp_path / "tiny.gguf")).encode("abc") == [2, 8, 11]


def test_unsupported_gguf_tokenizer_model(tmp_path):
    with pytest.raises(TokenizerError, match="'bert'.*supported.*'gpt2'.*'llama'"):
        tokenizer_from_gguf(_write_gguf(tmp_path / "bert.gguf", "bert"))


# ---------------------------------------------------------------------------------------------
# Gemma-3 (sentencepiece BPE from GGUF): ~1 min, mostly reading 262k tokens twice


@pytest.mark.slow
def test_gemma3_matches_transformers(tmp_path):
    path = _model_path("gemma3-270m")
    oracle = _transformers().AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gemma = tokenizer_from_gguf(gguf.GGUFReader(path))
    texts = TEXTS + ["<start_of_turn>user\nhi<end_of_turn>", "2024 ½ ¹²³ ٣٤٥", "<table><tr>\t\tx", "Ⅻ 𝔘𒀀"]
    for text in texts:
        assert gemma.encode(text) == oracle(text).input_ids, text
        assert gemma.decode(gemma.encode(text, add_special_tokens=False)) == text
    assert gemma.encode("hi")[0] == gemma.bos_id == 2 and gemma.eos_id == 1
    assert gemma.stop_ids == {1, 106}  # <eos> and <end_of_turn>
    assert gemma.token_strings(gemma.encode("Ⅻ", add_special_tokens=False)) == ["<0xE2>", "<0x85>", "<0xAB>"]
    _assert_same_tokenizer(gemma, tokenizer_from_spec(tmp_path, gemma.save(tmp_path)), texts)
