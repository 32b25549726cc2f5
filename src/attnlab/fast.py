"""Inference modes: the readable fp32 model, made fast for generation at load time.

A mode is applied to a loaded fp32 ``Transformer`` — the source of truth every inspection reads —
and changes only how its matrices are stored and multiplied:

* ``fp32``  the model as loaded.
* ``bf16``  every matrix in bf16 (half the bytes); residual stream, norms, attention and KV cache fp32.
* ``int8``  every matrix int8 per output channel (``compress/quantize.py``), bf16 activations at matmuls.
* ``int4``  block matrices int4 in groups of 32 (GGUF Q4_1's own form); embedding / LM head int8 in groups
            of 32 (Q8_0's form) with an int4 copy that shortlists the tokens the int8 rows re-score.

In every mode but fp32, W_Q, W_K, W_V are fused into one matrix and W_gate, W_up into another before
quantising: a decode step then runs 4 matmuls per layer instead of 7. ``auto`` picks the fastest
mode the machine runs for a decoder of 20M parameters or more (int4 on a CPU with torch's packed int4
kernel), and fp32 for an encoder, whose use is inspection, or a small model.
"""

import hashlib
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from attnlab.attention import MultiHeadAttention
from attnlab.compress.quantize import (
    INT4_GROUP_SIZE,
    Bf16Linear,
    Int4Linear,
    Int8Linear,
    QuantisedEmbedding,
    ShortlistHead,
    int4_supported,
)
from attnlab.config import ModelConfig
from attnlab.errors import InputError, WeightsFormatError
from attnlab.generate import DecodeStep, model_decode_step
from attnlab.kv_cache import KVCache
from attnlab.layers import GatedMLP
from attnlab.model import Transformer
from attnlab.paths import cache_dir, mark_used, prune_older_builds

MODES = ("fp32", "bf16", "int8", "int4")
AUTO_MIN_PARAMETERS = 20_000_000  # below this, decoding is bound by op overheads, not by weight bytes


def mode_unavailable(mode: str) -> str | None:
    """Why this machine cannot run ``mode`` (None if it can)."""
    if mode == "fp32":
        return None
    if mode == "bf16" and not torch.backends.mkldnn.is_available():
        return "bf16 matmuls need oneDNN (mkldnn), which this torch build lacks"
    if mode == "bf16" and not _cpu_has_bf16():
        return "this CPU has no bf16 instructions (AVX-512 BF16 or AMX): bf16 would be emulated and slow"
    if mode == "int8" and not hasattr(torch, "_weight_int8pack_mm"):
        return f"torch {torch.__version__} has no int8 weight kernel (torch._weight_int8pack_mm)"
    if mode == "int4" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} has no CPU int4 kernel (aten._weight_int4pack_mm_for_cpu)"
    return None


def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() in ("AVX512",)  # no cpuinfo (macOS): trust torch
    return "avx512_bf16" in flags or "amx_bf16" in flags


def supported_modes() -> list[str]:
    """The modes this machine runs, fastest last."""
    return [mode for mode in MODES if mode_unavailable(mode) is None]


def resolve_mode(requested: str, config: ModelConfig) -> str:
    """The mode to use: ``auto`` picks the fastest this machine runs; a forced mode that cannot run fails."""
    if requested not in (*MODES, "auto"):
        raise InputError(f"unknown mode {requested!r}; choose one of auto, {', '.join(MODES)}")
    if requested == "auto":
        if not (config.lm_head and config.causal) or config.n_parameters() < AUTO_MIN_PARAMETERS:
            return "fp32"  # an encoder is for inspection; a small model is overhead-bound: nothing to gain
        return supported_modes()[-1]
    reason = mode_unavailable(requested)
    if reason is not None:
        raise InputError(f"mode {requested} cannot run here: {reason}; use --mode auto or fp32")
    return requested


def fuse_projections(model: Transformer) -> None:
    """W_Q, W_K, W_V → one (H + 2·H_kv)·hd × d matrix; W_gate, W_up → one 2·d_ff × d matrix, per layer.

    Only the standard modules are fused: attention variants that override ``project`` keep theirs.
    """
    for block in model.blocks:
        attention = block.attention
        if type(attention) is MultiHeadAttention:
            attention.w_qkv = _concatenated(attention.w_q, attention.w_k, attention.w_v)
            del attention.w_q, attention.w_k, attention.w_v
        if isinstance(block.mlp, GatedMLP):
            block.mlp.w_gate_up = _concatenated(block.mlp.w_gate, block.mlp.w_up)
            del block.mlp.w_gate, block.mlp.w_up


def _concatenated(*linears: nn.Linear) -> nn.Linear:
    """One nn.Linear whose output is the outputs of ``linears`` side by side."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None, device=weight.device)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([linear.bias.detach() for linear in linears]), requires_grad=False)
    return fused


def _quantised(linear: nn.Linear, mode: str) -> nn.Module:
    """The mode's replacement for one matrix (int4 falls back to int8 for shapes its kernel refuses)."""
    if mode == "bf16":
        return Bf16Linear(linear.weight, linear.bias)
    if mode == "int4" and int4_supported(*linear.weight.shape):
        return Int4Linear(linear.weight, linear.bias)
    return Int8Linear(linear.weight, linear.bias)


def quantise(model: Transformer, mode: str) -> None:
    """Replace every matrix of the blocks, the LM head and the token embedding by the mode's form."""
    for block in model.blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, _quantised(child, mode))
    config = model.config
    table = _head(model.token_embedding.weight, mode)
    model.token_embedding = QuantisedEmbedding(table)
    if config.lm_head:
        model.quantised_head = table if config.tie_embeddings else _head(model.lm_head.weight, mode)
        if not config.tie_embeddings:
            del model.lm_head


def _head(weight: torch.Tensor, mode: str) -> nn.Module:
    """The vocabulary matrix in a mode: int4 alone flips near-tied greedy choices, so int4 mode shortlists with
    int4 and re-scores from int8 rows (``ShortlistHead``); int8 and bf16 store it as their other matrices."""
    if mode == "bf16":
        return Bf16Linear(weight)
    if mode == "int4" and int4_supported(*weight.shape):
        return ShortlistHead(weight)
    return Int8Linear(weight)


def prepare(model: Transformer, mode: str) -> Transformer:
    """Apply an inference mode (already resolved) to a loaded fp32 model, in place."""
    if mode == "fp32":
        return model
    fuse_projections(model)
    quantise(model, mode)
    return model.eval()


# ------------------------------------------------------------------------------------------ prepared weights


def save_prepared(model: Transformer, path: Path) -> None:
    """Write a prepared model (packed int4, int8, bf16 matrices…) to one file, atomically.

    The whole module is pickled, not a state dict: loading a state dict needs the prepared structure first, and
    building that (quantising on the meta device) runs Python reference kernels that import torch._dynamo — 2 s
    of every start. Unpickling builds nothing. The file is only read back by the code that wrote it: its name
    carries ``source_fingerprint()``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(model, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_prepared(path: Path) -> Transformer:
    """A model written by ``save_prepared``; each tensor in its own allocation (torch's packed int4/int8 kernels
    crash on weights that are not 64-byte aligned, as views into one file buffer can be)."""
    try:
        model = torch.load(path, weights_only=False)  # attnlab's own cache file, written by save_prepared
    except Exception as error:  # a truncated or foreign file: unpickling raises many kinds of error
        raise WeightsFormatError(f"{path}: unreadable prepared model ({error}); delete it to rebuild") from None
    if not isinstance(model, Transformer):
        raise WeightsFormatError(f"{path}: holds a {type(model).__name__}, not a prepared model; delete it to rebuild")
    return model.eval()


def source_fingerprint() -> str:
    """A hash of attnlab's own source files: what a pickled prepared model depends on besides torch."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ compiled decoding

class DecodeGraph(nn.Module):
    """The single-token decode step of one sequence as a function of tensors only, for torch.export.

    The cache's filled length travels as the *shape* of ``positions`` (length + 1 entries), so the exported
    graph is generic over it: attention reads only the filled prefix (a static-length cache would make every
    step cost the whole capacity). The new key and value are written into ``keys`` / ``values`` in place.
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        cache = KVCache.over(keys, values, length=positions.shape[0] - 1)
        return self.model(ids, kv_cache=cache, last_position_only=True)[:, -1]


class BatchDecodeGraph(DecodeGraph):
    """The decode step of a batch of B ≥ 2 left-padded rows: ``DecodeGraph`` plus what padding needs, the key
    mask over the filled slots and the new one (B, length + 1; its width carries the length) and each row's
    position (B, 1). B is dynamic too, so one package serves every batch size.

    A separate package rather than one graph for every B: torch.export cannot keep a dimension of size 1
    generic, and batch 1, the common case, needs no mask at all (its step reads no mask tensor).
    """

    def forward(self, ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,  # type: ignore[override]
                key_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cache = KVCache.over(keys, values, length=key_mask.shape[1] - 1)
        return self.model(ids, attention_mask=key_mask, position_ids=positions, kv_cache=cache,
                          last_position_only=True)[:, -1]


def compiled_decode_step(model: Transformer, key: str, *, quiet: bool = False) -> DecodeStep:
    """The decode step compiled ahead of time by AOTInductor, built once per model and machine and cached.

    Why compile: eager PyTorch spends ~4 ms per token launching ~600 small ops (30–35% of a step here) and
    ~8 ms more in Python between them; the compiled step fuses the small ops and runs them from C++ (SmolLM2
    int4: 86 vs 33 tok/s after a 34-token prompt, 62 vs 26 after 512). Why ahead of time: ``torch.compile``
    re-traces the model at every start (tens of seconds on a small CPU); a compiled package loads in a
    second or two. The KV cache is written in place (``KVCache.update`` says how that is made possible).

    Batches of several rows run a second package (``BatchDecodeGraph``), built at the first batch: ~2× the
    tokens/s of eager batches, since the int4 kernel multiplies 2-4 rows in little more time than one.
    """
    single = _loaded_package(model, key, batched=False, quiet=quiet)
    batched: DecodeStep | None = None
    eager = model_decode_step(model)

    def step(ids: torch.Tensor, kv_cache: KVCache, key_mask: torch.Tensor | None = None,
             positions: torch.Tensor | None = None) -> torch.Tensor:
        nonlocal batched
        if ids.shape[0] == 1 and key_mask is None and positions is None:
            return single(ids, kv_cache)
        if ids.shape[0] > MAX_COMPILED_BATCH:
            return eager(ids, kv_cache, key_mask, positions)
        if batched is None:
            batched = _loaded_package(model, key, batched=True, quiet=quiet)
        return batched(ids, kv_cache, key_mask, positions)

    return step


def _loaded_package(model: Transformer, key: str, *, batched: bool, quiet: bool) -> DecodeStep:
    """One compiled step (a batch of one, or of several rows), built if this machine has none yet."""
    # key names the model and mode; a package built by another source, torch or CPU never runs, and is pruned
    kind = f"{key}-{'batch' if batched else 'single'}"  # neither name a prefix of the other: each is pruned alone
    package = cache_dir() / "compiled" / f"{kind}-{source_fingerprint()}-{machine_key()}.pt2"
    built = not package.is_file()
    if built:
        if not quiet:
            what = "the batch decode step for this machine (first batch only" if batched else \
                "the decode step for this machine (first use only"
            print(f"attnlab: compiling {what}, ~2 min; later starts load it in seconds)…", file=sys.stderr, flush=True)
        start = time.perf_counter()
        _build_package(model, package, batched=batched)
        if not quiet:
            print(f"attnlab: compiled in {time.perf_counter() - start:.0f} s → {package}", file=sys.stderr)
        prune_older_builds(package.parent, f"{kind}-", ".pt2")
    else:
        mark_used(package)
    # The package's loader itself, not ``torch._inductor.aoti_load_package``: that first re-checks the CPU's
    # instruction sets by compiling test programs (2 s at every start; the package's name already carries the
    # machine), and its wrapper re-parses the call spec at every call. The step's inputs and output are flat.
    loader = torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, -1)
    loader.load_constants(_package_constants(model, loader.get_constant_fqns()), False, True, True)
    shape_carriers = torch.empty(model.config.context_length + 1)

    def step(ids: torch.Tensor, kv_cache: KVCache, key_mask: torch.Tensor | None = None,
             positions: torch.Tensor | None = None) -> torch.Tensor:
        length = kv_cache.length
        if batched:
            if key_mask is None:  # an unpadded batch: every slot is a real token, every row at the same position
                key_mask = torch.ones(ids.shape[0], length + 1, dtype=torch.bool, device=ids.device)
            if positions is None:
                positions = torch.full_like(ids, length)
            # contiguous: the package indexes its inputs by their sizes, and a slice of a wider mask is strided
            inputs = [ids, kv_cache.keys, kv_cache.values, key_mask.contiguous(), positions.contiguous()]
        else:
            inputs = [ids, kv_cache.keys, kv_cache.values, shape_carriers[:length + 1]]
        (logits,) = loader.boxed_run(inputs)
        kv_cache.advance(1)
        return logits

    # Checked once, when built: a guard on the constants' mapping (inductor's business), which a package keeps.
    disagreement = _disagreement_with_eager(model, step, batch_size=3 if batched else 1) if built else 0.0
    if disagreement > MAX_COMPILED_DISAGREEMENT:
        package.unlink()
        print(f"attnlab: the compiled decode step disagrees with the model (top logits off by {disagreement:.1%} "
              f"of the largest); decoding eagerly", file=sys.stderr)
        return model_decode_step(model)
    return step


# The compiled step rounds differently from the eager one (inductor fuses bf16 casts away): on SmolLM2 its top
# logits differ by 0.2-1.5 % of the largest. A step built on wrong constants is off by its whole scale.
MAX_COMPILED_DISAGREEMENT = 0.05


def _package_constants(model: Transformer, names: list[str]) -> dict[str, torch.Tensor]:
    """The package's constants, by name, taken from the model itself: the package is built without its own
    copy of the weights (``package_constants_in_so`` off), so the weights sit in memory once, not twice.
    Inductor adds one constant per int4 matmul that is no tensor of the model: the group size, an int64 scalar.
    """
    graph = DecodeGraph(model)
    tensors = dict(graph.named_parameters(remove_duplicate=False)) | dict(graph.named_buffers(remove_duplicate=False))
    group_size = torch.tensor(INT4_GROUP_SIZE)
    return {name: tensors.get(name, group_size) for name in names}


@torch.inference_mode()
def _disagreement_with_eager(model: Transformer, step: DecodeStep, batch_size: int = 1) -> float:
    """max |logit difference| between the step and the eager model on the eager model's 10 top tokens after a
    3-token context, relative to its largest logit (the top tokens: outside them the int4 head's shortlist may
    differ, which moves a logit by int4's error). In a batch, row 0 is left-padded by one slot."""
    context = torch.tensor([[1, 2, 3]] * batch_size)
    key_mask = positions = None
    if batch_size > 1:
        key_mask = torch.ones(batch_size, 4, dtype=torch.bool)
        key_mask[0, 0] = False
        positions = (key_mask.cumsum(1) - 1).clamp(min=0)  # (B, 4): the context's positions, then the new token's
    caches = []
    for _ in range(2):
        cache = model.new_kv_cache(batch_size, 8, dtype=model.dtype, device=model.device)
        model(context, attention_mask=None if key_mask is None else key_mask[:, :3],
              position_ids=None if positions is None else positions[:, :3], kv_cache=cache)
        caches.append(cache)
    token = torch.full((batch_size, 1), 4)
    new_position = None if positions is None else positions[:, 3:]
    expected = model_decode_step(model)(token, caches[0], key_mask, new_position)
    top = expected.topk(min(10, expected.shape[-1]), dim=-1).indices
    gap = (step(token, caches[1], key_mask, new_position).gather(-1, top) - expected.gather(-1, top)).abs().max()
    return (gap / expected.abs().max().clamp(min=1e-6)).item()


def _build_package(model: Transformer, package: Path, *, batched: bool = False) -> None:
    """Export the decode step with a dynamic cache length and capacity (and batch size, for a batch step),
    compile it, write it atomically."""
    context = model.config.context_length
    length = torch.export.Dim("length_plus_one", min=2, max=context)
    capacity = torch.export.Dim("capacity", min=2, max=context)
    # Example sizes all different (3 rows, 8 slots, 5 filled): export would take equal ones for one dimension
    batch_size = 3 if batched else 1
    cache = model.new_kv_cache(batch_size, 8, dtype=model.dtype, device=model.device)
    ids = torch.zeros(batch_size, 1, dtype=torch.long)
    if batched:
        rows = torch.export.Dim("batch", min=2, max=MAX_COMPILED_BATCH)
        graph: nn.Module = BatchDecodeGraph(model)
        example = (ids, cache.keys, cache.values, torch.ones(batch_size, 5, dtype=torch.bool),
                   torch.zeros(batch_size, 1, dtype=torch.long))
        dynamic_shapes = {"ids": {0: rows}, "keys": {1: rows, 3: capacity}, "values": {1: rows, 3: capacity},
                          "key_mask": {0: rows, 1: length}, "positions": {0: rows}}
    else:
        graph = DecodeGraph(model)
        example = (ids, cache.keys, cache.values, torch.empty(5))
        dynamic_shapes = {"ids": None, "keys": {3: capacity}, "values": {3: capacity}, "positions": {0: length}}
    package.parent.mkdir(parents=True, exist_ok=True)
    partial = package.with_name(f".{package.name}.{os.getpid()}.tmp.pt2")
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecation notices, not the user's business
        try:
            exported = torch.export.export(graph, example, dynamic_shapes=dynamic_shapes)
            # No weights in the package (the model lends its own at load) and no constants folded into new ones
            # (they would be tensors the model does not have).
            torch._inductor.aoti_compile_and_package(exported, package_path=str(partial), inductor_configs={
                "aot_inductor.package_constants_in_so": False, "joint_graph_constant_folding": False})
            os.replace(partial, package)
        finally:
            partial.unlink(missing_ok=True)


MAX_COMPILED_BATCH = 64  # rows a batch package takes; a larger batch decodes eagerly


def machine_key() -> str:
    """What prepared weights and compiled kernels are specific to: the torch version and the CPU's instruction
    set (torch packs int4 weights in one layout for AVX-512 and another for AVX2)."""
    text = f"{torch.__version__}|{platform.machine()}|{torch.backends.cpu.get_cpu_capability()}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]
