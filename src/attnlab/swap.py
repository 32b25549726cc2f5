"""Swap the attention kernel of a trained model at inference, and measure what it costs.

The weights stay; only the rule that turns q, k, v into each head's output changes. With the same
W_Q, W_K, W_V, W_O, head h of a swapped layer computes (q_i, k_j after QK-norm and RoPE, as before)

============ ====================================================================================
softmax      w_ij = softmax_j(q_i·k_j/√d_k + M)          what every pretrained model was trained with
kernel       w_ij ∝ exp(−‖q_i − k_j‖²/(2√d_k))           Gaussian kernel smoothing (distance, not angle)
sigmoid      w_ij = σ(q_i·k_j/√d_k − log n)               each key on its own; rows need not sum to 1
linear:φ     w_ij = φ(q_i)·φ(k_j) / Σ_l φ(q_i)·φ(k_l)      φ = elu + 1 or relu; no scale, no exp
sliding-     M_ij = −∞ where i − j ≥ w                    a mask, not a kernel: the layer's own mixing
window:w                                                  rule, over the w most recent keys only
============ ====================================================================================

The projection variants (no-q, no-k, no-v, merged-qk) cannot be swapped in: they re-parameterise
W_Q, W_K or W_V, so a trained model has no values for their parameters. They are trained instead.

How much perplexity rises says how much of what the model learned depends on softmax itself:
the exponential's sharpness, the competition between keys, the normalisation.
"""

import copy
import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from attnlab.attention import MultiHeadAttention
from attnlab.errors import InputError
from attnlab.evaluate import Perplexity, perplexity
from attnlab.lm import LanguageModel
from attnlab.variants import KernelAttention, LinearAttention, SigmoidAttention, Variant, make_attention, parse_variant

PROJECTION_VARIANTS = ("no-q", "no-k", "no-v", "merged-qk")
# Modules whose only parameters are the standard W_Q, W_K, W_V, W_O (+ QK-norm): any of them can
# take another mixing rule with the same state dict.
STANDARD_PROJECTIONS = (MultiHeadAttention, KernelAttention, SigmoidAttention, LinearAttention)
DEFAULT_CORPUS = "sotu"
DEFAULT_MAX_TOKENS = 2048  # × (1 original + N swaps) forward passes of 512 tokens: ~2 min for 4 swaps
DEFAULT_CONTEXT = 512  # SmolLM2 on 2 CPU cores; longer windows cost quadratic attention for sigmoid


def swap_variant(spec: str) -> Variant:
    """The parsed spec, or InputError saying why it cannot be swapped into a trained model."""
    variant = parse_variant(spec)
    if variant.name in PROJECTION_VARIANTS:
        raise InputError(f"{variant} cannot be swapped into a trained model: it re-parameterises W_Q/W_K/W_V, so "
                         f"the model's weights have no values for it; train it instead (attnlab train with "
                         f"model.attention = \"{variant}\"). Swappable: softmax, kernel, sigmoid, linear:elu, "
                         f"linear:relu, sliding-window:<w>")
    return variant


def parse_layers(text: str, n_layers: int | None = None) -> list[int] | None:
    """"all" → None (every layer); "0-5" → [0 … 5]; "0,3,7" and mixes like "0-2,9" → sorted, no repeats.

    Without ``n_layers`` only the form is checked (before a model is loaded), with it the range too.
    """
    text = text.strip().lower()
    if text == "all":
        return None
    layers: set[int] = set()
    for piece in text.split(","):
        piece = piece.strip()
        first, dash, last = piece.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise InputError(f"--layers: {piece!r} is neither a layer number nor a range; give all, 0-5 or 0,3,7")
        low, high = int(first), int(last) if dash else int(first)
        if low > high:
            raise InputError(f"--layers: range {piece!r} runs backwards; write {high}-{low}")
        layers.update(range(low, high + 1))
    if n_layers is not None and max(layers) >= n_layers:
        raise InputError(f"--layers: layer {max(layers)} does not exist: the model has {n_layers} layers, "
                         f"numbered 0-{n_layers - 1}")
    return sorted(layers)


def layers_label(layers: Sequence[int], n_layers: int) -> str:
    """'all', '3' or '0-5' / '0,3,7', the way --layers reads them."""
    if list(layers) == list(range(n_layers)):
        return "all"
    runs = [[n for _, n in group] for _, group in itertools.groupby(enumerate(layers), lambda e: e[1] - e[0])]
    return ",".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


@torch.no_grad()
def swap_attention(lm: LanguageModel, spec: str, layers: Sequence[int] | None = None) -> LanguageModel:
    """A new model whose ``layers`` (default all) compute attention by ``spec`` from ``lm``'s own weights.

    The weights are shared with ``lm``, not copied (swapping a 135M-parameter model costs no memory);
    ``lm`` itself is unchanged. A mixing spec (softmax, kernel, sigmoid, linear:φ) replaces the module
    of each chosen layer by that variant's, loaded with the layer's state dict as it is; the mask stays
    (a local layer stays local). ``sliding-window:w`` keeps each chosen layer's module and gives it the
    local mask with window w, so a kernel layer becomes a kernel over the w most recent keys.

    What the config describes afterwards: shapes, positions, norms — and ``config.attention`` still
    names the *original* variant, for every layer. The truth per layer is the module
    (``model.blocks[l].attention``, whose class is the variant) and ``model.layer_kinds[l]`` /
    ``model.local_window`` (the mask); inspection reads those. Rebuilding a model from this config
    (``build_model``, saving a checkpoint) gives back the original, not the swap.
    """
    variant = swap_variant(spec)
    original = lm.model
    config = lm.config
    chosen = list(range(config.n_layers)) if layers is None else sorted(set(layers))
    lm.check_layers_heads(chosen, [0])
    for layer in chosen:
        module = original.blocks[layer].attention
        if type(module) not in STANDARD_PROJECTIONS:
            raise InputError(f"layer {layer} of {lm.name} is a {config.attention} layer, with no W_Q/W_K/W_V of the "
                             f"standard form: only models with standard projections can swap their kernel")
    # Share every parameter and buffer: deepcopy takes tensors already in its memo as they are.
    shared = {id(t): t for t in itertools.chain(original.parameters(), original.buffers())}
    model = copy.deepcopy(original, memo=shared)
    if variant.window is not None:
        _set_window(model, chosen, variant.window, lm.name)
    else:
        layer_config = dataclasses.replace(config, attention=str(variant))  # validates: linear refuses softcap
        for layer in chosen:
            block = model.blocks[layer]
            with torch.device("meta"):
                module = make_attention(layer_config, layer)
            module.load_state_dict(block.attention.state_dict(), assign=True)
            block.attention = module.train(block.attention.training)
    label = layers_label(chosen, config.n_layers)
    return LanguageModel(model, lm.tokenizer, f"{lm.name} [{variant}{'' if label == 'all' else ', layers ' + label}]")


def _set_window(model, chosen: list[int], window: int, name: str) -> None:
    """Give ``chosen`` layers the local mask with ``window``. A model has one local window, so other
    local layers that keep a different one (Gemma-3's w = 512 layers, say) make the swap impossible."""
    keeping = [layer for layer, (_, mask) in enumerate(model.layer_kinds) if mask == "local" and layer not in chosen]
    if keeping and model.local_window != window:
        raise InputError(f"{name} already has sliding-window layers ({layers_label(keeping, len(model.layer_kinds))}) "
                         f"with window {model.local_window}, and one model has one local window: swap those layers "
                         f"too (--layers all) or use window {model.local_window}")
    for layer in chosen:
        rope_kind, _ = model.layer_kinds[layer]
        model.layer_kinds[layer] = (rope_kind, "local")  # positions still rotate as the layer's type says
    model.local_window = window


@dataclass
class SwapResult:
    """One swapped model's perplexity on the held-out tokens."""

    spec: str
    layers: list[int]
    perplexity: Perplexity


@dataclass
class SwapReport:
    """Perplexity of the original model and of each swap, all on the same windows of the same tokens."""

    model: str
    n_layers: int
    original: Perplexity
    swaps: list[SwapResult]

    def change(self, swap: SwapResult) -> float:
        """Perplexity change vs the original, in %."""
        return 100.0 * (swap.perplexity.perplexity / self.original.perplexity - 1.0)

    def to_json(self) -> dict:
        return {"model": self.model, "original": self.original.to_json(),
                "swaps": [{"to": swap.spec, "layers": swap.layers,
                           "layers_label": layers_label(swap.layers, self.n_layers),
                           "change_percent": self.change(swap)} | swap.perplexity.to_json() for swap in self.swaps]}


def swap_perplexities(lm: LanguageModel, specs: Sequence[str], text: str, *, layers: Sequence[int] | None = None,
                      source: str = "text", context: int | None = None, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                      say: Callable[[str], None] = lambda message: None) -> SwapReport:
    """Perplexity of ``lm`` and of ``lm`` with ``layers`` swapped to each of ``specs``, on ``text``.

    Windows of ``context`` tokens (default min(512, the model's)) that do not overlap: each model
    costs max_tokens / context forward passes, and every model scores the same tokens.
    """
    variants = [swap_variant(spec) for spec in specs]  # every spec checked before the first evaluation
    context = min(DEFAULT_CONTEXT, lm.config.context_length) if context is None else context
    chosen = list(range(lm.config.n_layers)) if layers is None else sorted(set(layers))
    swapped = [swap_attention(lm, str(variant), chosen) for variant in variants]  # refusals before any work

    def score(model: LanguageModel) -> Perplexity:
        return perplexity(model, text, context=context, stride=context, max_tokens=max_tokens, source=source,
                          progress=True)

    say(f"perplexity of the original model on {source}…")
    original = score(lm)
    results = []
    for variant, model in zip(variants, swapped):
        say(f"perplexity with {variant} in layers {layers_label(chosen, lm.config.n_layers)}…")
        results.append(SwapResult(str(variant), chosen, score(model)))
    return SwapReport(model=lm.name, n_layers=lm.config.n_layers, original=original, swaps=results)
