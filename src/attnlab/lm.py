"""``attnlab.load(source)`` and the LanguageModel it returns: model + tokenizer + generation.

A source is a named model (``smollm2-135m-instruct``), a ``.gguf`` file, a Hugging Face folder
(config.json + safetensors + tokenizer.json) or an attnlab checkpoint folder.
"""

import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from attnlab import fast
from attnlab.capture import Capture
from attnlab.config import ModelConfig
from attnlab.errors import AttnlabError, InputError, ModelNotFoundError
from attnlab.generate import DecodeStep, SamplingConfig, generate_batch_steps, generate_token_ids, stream_text
from attnlab.inspect.attention_map import AttentionMap, group_words
from attnlab.model import Transformer
from attnlab.paths import cache_dir, mark_used, prune_older_builds
from attnlab.tokenizer import HFTokenizer, Tokenizer, tokenizer_from_gguf, tokenizer_from_spec
from attnlab.weights import build_model
from attnlab.weights.checkpoint import is_checkpoint, load_checkpoint, read_manifest, save_checkpoint
from attnlab.weights.huggingface import load_hf_folder
from attnlab.weights.registry import DEFAULT_MODEL, NAMED_MODELS, resolve_named_model

CONVERTED_FORMAT = "2"  # bump when the GGUF conversion changes, so stale caches are not reused
PREPARED_FORMAT = "4"  # bump when attnlab.fast changes how a prepared (quantised) model is stored
MAX_INSPECT_TOKENS = 1024  # SmolLM2: 30 layers × 9 heads × 1024² fp32 = 1.1 GB of attention maps


class LanguageModel:
    """A Transformer with its tokenizer: the object users and every command work with."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str, *, mode: str = "fp32",
                 decode_step: DecodeStep | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.mode = mode  # the inference mode the weights are in (attnlab.fast): fp32 is the exact model
        self.decode_step = decode_step  # a compiled decode step (attnlab.fast), or None for the model itself

    @property
    def config(self):
        return self.model.config

    def __repr__(self) -> str:
        c = self.config
        return (f"LanguageModel({self.name!r}, family={c.family}, layers={c.n_layers}, heads={c.n_heads}/"
                f"{c.n_kv_heads} kv, d_model={c.d_model}, params={c.n_parameters() / 1e6:.1f}M, mode={self.mode})")

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids LongTensor (B, T) → logits (B, T, vocab). Encoders (no LM head) raise InputError."""
        self._require_decoder("compute next-token logits")
        return self.model(self._check_ids(ids), attention_mask=attention_mask)

    @torch.inference_mode()
    def hidden_states(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) → final hidden states (B, T, d_model)."""
        return self.model(self._check_ids(ids), attention_mask=attention_mask, return_hidden=True)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentence embeddings (N, d_model): mean of the final hidden states over real tokens, L2-normalised
        (how all-MiniLM-L6-v2 is meant to be used)."""
        encoded = [self.tokenizer.encode(text) for text in texts]
        length = max(len(ids) for ids in encoded)
        ids = torch.zeros(len(encoded), length, dtype=torch.long)
        mask = torch.zeros(len(encoded), length, dtype=torch.long)
        for row, row_ids in enumerate(encoded):
            ids[row, :len(row_ids)] = torch.tensor(row_ids)
            mask[row, :len(row_ids)] = 1
        hidden = self.hidden_states(ids, attention_mask=mask)
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(pooled, dim=-1)

    @torch.inference_mode()
    def attention(self, text_or_ids: str | Sequence[int], *, layers: Sequence[int] | None = None,
                  heads: Sequence[int] | None = None) -> AttentionMap:
        """The attention probabilities of ``layers`` × ``heads`` (default: all) for one input.

        Text is encoded with the model's special tokens (BERT's [CLS]…[SEP], Gemma's <bos>); ids are
        used as given. Only the asked-for layers run the explicit path and keep their T×T tensors.
        """
        ids = self._input_ids(text_or_ids)
        config = self.config
        layers = list(range(config.n_layers)) if layers is None else list(layers)
        heads = list(range(config.n_heads)) if heads is None else list(heads)
        self.check_layers_heads(layers, heads)
        capture = Capture(points=("probs",), layers=layers, heads=heads)
        self.model(torch.tensor([ids]), capture=capture, return_hidden=True)
        probs = torch.stack([capture.get("probs", layer)[0] for layer in layers]).float()  # (L, H, T, T)
        tokens = self.tokenizer.token_strings(ids)
        words, word_of_token = group_words(self.tokenizer, ids, tokens)
        text = text_or_ids if isinstance(text_or_ids, str) else self.tokenizer.decode(ids)
        return AttentionMap(model=self.name, text=text, token_ids=ids, tokens=tokens, words=words,
                            word_of_token=word_of_token, layers=layers, heads=heads, probs=probs,
                            n_query_heads=config.n_heads, n_kv_heads=config.n_kv_heads, causal=config.causal)

    def check_layers_heads(self, layers: Sequence[int], heads: Sequence[int]) -> None:
        """InputError naming the first layer or query head index this model does not have."""
        config = self.config
        for name, chosen, count in (("layer", layers, config.n_layers), ("head", heads, config.n_heads)):
            bad = [i for i in chosen if not 0 <= i < count]
            if bad or not chosen:
                raise InputError(f"{name} {bad[0] if bad else '(none)'} does not exist: {self.name} has {count} "
                                 f"{name}s, numbered 0-{count - 1}")

    def _input_ids(self, text_or_ids: str | Sequence[int], limit: int = MAX_INSPECT_TOKENS) -> list[int]:
        """Token ids of an input to inspect, checked against the context and the inspection limit."""
        if isinstance(text_or_ids, str):
            if not text_or_ids.strip():
                raise InputError("the text is empty: give a sentence to look at")
            ids = self.tokenizer.encode(text_or_ids)
        else:
            ids = [int(i) for i in (text_or_ids.flatten() if isinstance(text_or_ids, torch.Tensor) else text_or_ids)]
            if not ids:
                raise InputError("ids is empty: give at least one token")
            bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
            if bad:
                raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        limit = min(limit, self.config.context_length)
        if len(ids) > limit:
            raise InputError(f"the text is {len(ids)} tokens; attention inspection takes at most {limit} "
                             f"(the T×T maps of every layer grow with the square of the length): shorten it")
        return ids

    def prompt_ids(self, prompt: str, *, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids for a prompt; with ``chat`` it is wrapped in the model's chat template first."""
        if not prompt.strip():
            raise InputError("the prompt is empty: give some text")
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            return self.chat_ids(messages)
        return self.tokenizer.encode(prompt)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream_ids(self, ids: Sequence[int], *, max_new_tokens: int = 256, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                   stop: Sequence[str] = ()) -> Iterator[str]:
        """Stream the text generated after the token ids ``ids``."""
        self._require_decoder("generate text")
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        stop_ids = self.tokenizer.stop_ids
        tokens = generate_token_ids(self.model, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                    stop_ids=stop_ids, decode_step=self.decode_step)
        return stream_text(tokens, self.tokenizer.decode, stop_ids, stop)

    def stream(self, prompt: str, *, chat: bool = False, system: str | None = None, **sampling) -> Iterator[str]:
        """Stream generated text piece by piece (see :meth:`generate` for the options)."""
        return self.stream_ids(self.prompt_ids(prompt, chat=chat, system=system), **sampling)

    def generate(self, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = (),
                 chat: bool = False, system: str | None = None) -> str:
        """Continue ``prompt`` (or answer it, with ``chat=True``) and return the new text.

        temperature 0 (the default) is greedy decoding; generation ends at the model's end-of-text
        token, at any of the ``stop`` strings, or after max_new_tokens.
        """
        return "".join(self.stream(prompt, chat=chat, system=system, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop))

    def generate_batch(self, prompts: Sequence[str], *, max_new_tokens: int = 256, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                       stop: Sequence[str] = (), chat: bool = False, system: str | None = None) -> list[str]:
        """Continue (or, with ``chat``, answer) several prompts at once; one text per prompt, in order.

        Each text is what :meth:`generate` gives for that prompt alone (greedy; when sampling, prompt
        i draws with seed + i). One left-padded batch: each decode step reads the weights once for
        every prompt, which is what makes it faster than one prompt after another.
        """
        if isinstance(prompts, str):
            raise InputError("generate_batch takes a list of prompts; for one prompt use generate")
        if not prompts:
            raise InputError("no prompts: give at least one")
        ids = []
        for number, prompt in enumerate(prompts, 1):
            try:
                ids.append(self.prompt_ids(prompt, chat=chat, system=system))
            except AttnlabError as error:
                raise type(error)(f"prompt {number} of {len(prompts)}: {error}") from None
        return self.generate_batch_ids(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed, stop=stop)

    def generate_batch_ids(self, prompts_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                           seed: int | None = None, stop: Sequence[str] = ()) -> list[str]:
        """The texts generated after each of several token-id prompts, decoded together (see generate_batch).

        A row is done at the end-of-text token, a stop string or max_new_tokens; the batch ends when every
        row is done (rows done early are still fed, their text no longer grows).
        """
        self._require_decoder("generate text")
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        stop_ids, decode = self.tokenizer.stop_ids, self.tokenizer.decode
        generated: list[list[int]] = [[] for _ in prompts_ids]
        done = [False] * len(generated)
        for step in generate_batch_steps(self.model, prompts_ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                         stop_ids=stop_ids, decode_step=self.decode_step):
            for row, token in enumerate(step.tokens):
                if token is None or done[row]:
                    continue
                generated[row].append(token)
                done[row] = token in stop_ids or any(text in decode(generated[row]) for text in stop)
            if all(done):
                break  # every row hit a stop id or a stop string: end now, not at max_new_tokens
        # the same cut at stop ids and stop strings as streaming one prompt makes
        return ["".join(stream_text(iter(ids), decode, stop_ids, stop)) for ids in generated]

    def _require_decoder(self, action: str) -> None:
        if not self.config.lm_head:
            raise InputError(f"{self.name} is an encoder ({self.config.family}) with no language-model head: "
                             f"it cannot {action}; use it to inspect attention or for embeddings")

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            raise InputError("ids must be a LongTensor of shape (batch, tokens)")
        if ids.shape[1] == 0:
            raise InputError("ids is empty: give at least one token")
        if ids.shape[1] > self.config.context_length:
            raise InputError(f"{ids.shape[1]} tokens exceed the model's context of {self.config.context_length}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise InputError(f"token ids must lie in [0, {self.config.vocab_size})")
        return ids


def load(source: str | Path = DEFAULT_MODEL, *, use_cache: bool = True, mode: str = "fp32",
         compile: bool | None = None) -> LanguageModel:
    """Load a model by name, .gguf path, Hugging Face folder, attnlab checkpoint or training run folder.

    GGUF files are dequantised to fp32 once and cached as an attnlab checkpoint (``use_cache``),
    because parsing and dequantising a GGUF takes seconds that nobody should pay at every start.

    mode: ``fp32`` (default: the exact model, what inspection reads), ``bf16``, ``int8``, ``int4`` or
    ``auto`` (the fastest this machine runs; see ``attnlab.fast``). A prepared (quantised) model is cached
    too, so later loads never touch the fp32 weights. compile: run the decode step compiled ahead of time
    by AOTInductor (built once per model, mode and machine, then reused; see ``fast.compiled_decode_step``).
    None (the default) compiles a decoder in a quantised mode, where it is 2-3× faster than eager, and not
    in fp32, which is for inspection.
    """
    text = str(source)
    if text in NAMED_MODELS:
        path, name = resolve_named_model(text), text
    else:
        path, name = Path(text).expanduser(), Path(text).name
        if not path.exists():
            raise ModelNotFoundError(f"{text}: no such file or folder, and not a named model "
                                     f"(named models: {', '.join(NAMED_MODELS)})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{path}: expected a .gguf file, a Hugging Face folder or an attnlab checkpoint")
        converted = _converted_gguf(path, name, use_cache)
        if isinstance(converted, LanguageModel):  # not cached: the freshly converted fp32 model
            return _with_mode(converted, mode, compile, cache_key=None)
        return _load_checkpoint_folder(converted, name, str(path), mode, compile, use_cache)
    if not is_checkpoint(path) and is_checkpoint(path / "checkpoint"):  # a training run's folder
        path = path / "checkpoint"
    if is_checkpoint(path):
        return _load_checkpoint_folder(path, name, str(path), mode, compile, use_cache)
    if (path / "config.json").is_file():
        config, state = load_hf_folder(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelNotFoundError(f"{path}: no tokenizer.json beside config.json")
        lm = LanguageModel(build_model(config, state, str(path)), HFTokenizer.from_file(path / "tokenizer.json"), name)
        return _with_mode(lm, mode, compile, cache_key=None)
    raise ModelNotFoundError(f"{path}: folder holds neither attnlab.json (attnlab checkpoint) nor config.json "
                             f"(Hugging Face checkpoint)")


def _load_checkpoint_folder(folder: Path, name: str, source: str, mode: str, compile: bool | None,
                            use_cache: bool) -> LanguageModel:
    """An attnlab checkpoint in the asked-for mode; a prepared (quantised) copy is cached beside the others."""
    manifest = read_manifest(folder)
    if manifest.get("tokenizer") is None:
        raise ModelNotFoundError(f"{folder}: checkpoint has no tokenizer")
    config = ModelConfig.from_dict(manifest["config"])
    tokenizer = tokenizer_from_spec(folder, manifest["tokenizer"])
    resolved = fast.resolve_mode(mode, config)
    weights = folder / "model.safetensors"
    stat = weights.stat() if weights.exists() else None
    key = hashlib.sha256(f"{folder.resolve()}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}".encode())
    key = key.hexdigest()[:24]
    # Builds of this model in this mode (prepared weights here, a compiled step in attnlab.fast) are named
    # "{key}-{mode}-…" followed by what else they depend on; the older ones are pruned when a new one is written.
    build = f"{key}-{resolved}"
    prepared = (cache_dir() / "prepared" /
                f"{build}-{PREPARED_FORMAT}-{fast.source_fingerprint()}-{fast.machine_key()}.pt")
    if resolved != "fp32" and use_cache and prepared.is_file():
        lm = LanguageModel(fast.load_prepared(prepared), tokenizer, name, mode=resolved)
        mark_used(prepared)
        return _with_mode(lm, resolved, compile, cache_key=key)
    config, state, _ = load_checkpoint(folder)
    lm = _with_mode(LanguageModel(build_model(config, state, source), tokenizer, name), resolved, compile, key)
    if resolved != "fp32" and use_cache:
        try:
            fast.save_prepared(lm.model, prepared)
            prune_older_builds(prepared.parent, f"{build}-", ".pt")
        except OSError as error:
            print(f"attnlab: could not cache the {resolved} model in {prepared} ({error}); continuing",
                  file=sys.stderr)
    return lm


def _with_mode(lm: LanguageModel, mode: str, compile: bool | None, cache_key: str | None) -> LanguageModel:
    """Apply an inference mode to a loaded model (a no-op for one already prepared) and compile its decode step
    (``compile`` None: in the quantised modes)."""
    resolved = fast.resolve_mode(mode, lm.config)
    if lm.mode != resolved:
        fast.prepare(lm.model, resolved)
        lm.mode = resolved
    if compile is None:
        compile = resolved != "fp32"
    if compile and lm.config.lm_head and lm.config.causal:
        key = cache_key or hashlib.sha256(json.dumps(lm.config.to_dict(), sort_keys=True).encode()).hexdigest()[:24]
        lm.decode_step = fast.compiled_decode_step(lm.model, f"{key}-{resolved}")
    return lm


def _converted_gguf(path: Path, name: str, use_cache: bool) -> Path | LanguageModel:
    """The folder of a GGUF's cached fp32 conversion (made now if missing), or, without the cache, the model."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERTED_FORMAT}".encode())
    cached = cache_dir() / "converted" / key.hexdigest()[:24]
    if use_cache and is_checkpoint(cached):
        return cached
    from attnlab.weights.gguf import load_gguf, open_gguf  # here: the gguf library adds ~0.15 s to every start

    reader = open_gguf(path)
    print(f"attnlab: dequantising {path.name} to fp32 (first use only, ~10-30 s)…", file=sys.stderr)
    config, state = load_gguf(path, reader)
    tokenizer = tokenizer_from_gguf(reader)
    model = build_model(config, state, str(path))
    if use_cache:
        try:
            save_checkpoint(cached, config, model.state_dict(), tokenizer, extra={"source": str(path)})
            return cached
        except OSError as error:
            print(f"attnlab: could not cache the converted model in {cached} ({error}); continuing", file=sys.stderr)
    return LanguageModel(model, tokenizer, name)
