"""W_QK and W_OV of every head: spectra, whether merging W_Q·W_Kᵀ is exact, and what rank-r costs.

**Convention.** Row vectors, as Elhage et al. (2021) write circuits: a token's residual stream entering
attention is x (1×d). Query head h reads key/value head g = h // (H / H_kv) (grouped-query attention).
With W_Q^h = w_q.weight[h·hd:(h+1)·hd]ᵀ (d×hd) and likewise W_K^g, W_V^g, and W_O^h = w_o.weight[:,
h·hd:(h+1)·hd]ᵀ (hd×d)::

    q_i = x_i W_Q^h + b_Q^h,   k_j = x_j W_K^g + b_K^g,   score_ij = q_i · k_j

    W_QK^h = W_Q^h W_K^gᵀ   (d×d, rank ≤ hd)      score_ij = x_i W_QK^h x_jᵀ + bias terms
    W_OV^h = W_V^g W_O^h    (d×d, rank ≤ hd)      what head h writes when it attends to x_j: x_j W_OV^h

**Biases, exactly.** Append a 1 to x: x̃ = [x, 1] (1×(d+1)), W̃_Q = [W_Q; b_Q] ((d+1)×hd), the same
for K. Then q_i = x̃_i W̃_Q, k_j = x̃_j W̃_K and score_ij = x̃_i W̃_QK x̃_jᵀ with W̃_QK = W̃_Q W̃_Kᵀ:
the bias terms (x_i W_Q b_Kᵀ, b_Q W_Kᵀ x_jᵀ, b_Q b_Kᵀ) are the last column, row and corner of
W̃_QK. (b_V is left out of W_OV: the probabilities of a row sum to 1, so it adds the same b_V W_O^h to
every output, a constant, not a circuit.)

**When merging is exact.** With learned absolute positions (GPT-2, BERT) the position is added to x
before the block, so the score is a bilinear form in x̃ and one matrix W̃_QK per head gives it exactly
(up to float rounding). With RoPE (Llama, SmolLM2, Qwen3, Gemma-3) q and k are rotated by their
positions, q_i R_i · k_j R_j = x_i W_Q R_{j−i} W_Kᵀ x_jᵀ: a different matrix for every distance j − i,
so no single W_QK exists. QK-norm (Qwen3, Gemma-3) divides q and k by their RMS first, a nonlinearity
no matrix captures. :func:`merge_exactness` measures both on a text, against the scores the model
itself computed.

**Singular values without the d×d matrix.** For thin factors A, B (n×hd, n = d or d+1): QR-factor
A = Q_a R_a and B = Q_b R_b (Q orthonormal columns, R hd×hd). Then A Bᵀ = Q_a (R_a R_bᵀ) Q_bᵀ, and
multiplying by matrices with orthonormal columns on both sides keeps the singular values, so
σ(A Bᵀ) = σ(R_a R_bᵀ): an hd×hd SVD instead of a d×d one (SmolLM2: 64×64 instead of 576×576, ×270
heads). With R_a R_bᵀ = U S Vᵀ, A Bᵀ = (Q_a U) S (Q_b V)ᵀ is the SVD itself, which gives the rank-r
factors U_r S_r^{1/2} and V_r S_r^{1/2} of the best rank-r approximation (Eckart–Young).

**Effective rank**, two ways per head: the entropy effective rank exp(H(p)), p_i = σ_i / Σσ (Roy &
Vetterli, 2007; k equal singular values give k), and the 90%-energy rank, the fewest singular values
whose squares hold 90% of Σσ² (= ‖W‖_F²).
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from attnlab.attention import MultiHeadAttention
from attnlab.capture import Capture
from attnlab.errors import InputError
from attnlab.evaluate import Perplexity, perplexity
from attnlab.lm import LanguageModel
from attnlab.weights import build_model

ENERGY_FRACTION = 0.9  # the energy rank counts singular values up to this share of Σσ²
EXACT_TOLERANCE = 1e-4  # relative error below this is float rounding, above it the merge is not exact
DEFAULT_CONTEXT = 512  # perplexity windows: short enough that 4,096 tokens take ~10 s per model (SmolLM2, 2 cores)
DEFAULT_MAX_TOKENS = 4096
ROPE_REASON = "RoPE rotates q and k by position: W_QK depends on j−i (score = x_i W_Q R_{j−i} W_Kᵀ x_jᵀ)"
QK_NORM_REASON = "QK-norm divides q and k by their RMS before q·k: a nonlinearity no matrix holds"


def kv_head_of(attention: MultiHeadAttention, head: int) -> int:
    """The key/value head g that query head h reads: g = h // (H / H_kv)."""
    return head // (attention.n_heads // attention.n_kv_heads)


def _augmented(linear: torch.nn.Linear, head: int, head_dim: int, with_bias: bool) -> torch.Tensor:
    """[W; b] of one head of a q/k/v projection in the row-vector convention: (d(+1), hd), float64."""
    rows = slice(head * head_dim, (head + 1) * head_dim)
    weight = linear.weight.detach()[rows].T.double()  # (d, hd): x · W
    if not with_bias:
        return weight
    bias = linear.bias.detach()[rows].double() if linear.bias is not None else weight.new_zeros(head_dim)
    return torch.cat([weight, bias[None]], dim=0)  # (d+1, hd)


def qk_factors(attention: MultiHeadAttention, *, with_bias: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(W̃_Q, W̃_K) of every query head, each (H, d(+1), hd): W̃_QK^h = W̃_Q[h] W̃_K[h]ᵀ.

    The key factor is that of the kv head each query head reads (repeated for grouped-query heads).
    ``with_bias`` appends the bias row (module docstring); without it the factors are W_Q, W_K.
    """
    hd = attention.head_dim
    queries = [_augmented(attention.w_q, h, hd, with_bias) for h in range(attention.n_heads)]
    keys = [_augmented(attention.w_k, kv_head_of(attention, h), hd, with_bias) for h in range(attention.n_heads)]
    return torch.stack(queries), torch.stack(keys)


def ov_factors(attention: MultiHeadAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_V, W_Oᵀ) of every query head, each (H, d, hd): W_OV^h = W_V[h] W_Oᵀ[h]ᵀ = W_V^g W_O^h."""
    hd = attention.head_dim
    values = [_augmented(attention.w_v, kv_head_of(attention, h), hd, False) for h in range(attention.n_heads)]
    w_o = attention.w_o.weight.detach().double()  # (d, H·hd): y = z · w_oᵀ
    outputs = [w_o[:, h * hd:(h + 1) * hd] for h in range(attention.n_heads)]  # (d, hd) = W_O^hᵀ
    return torch.stack(values), torch.stack(outputs)


def _qr_core(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q_a, R_a R_bᵀ, Q_b) for thin factors A, B (…, n, k): A Bᵀ = Q_a (R_a R_bᵀ) Q_bᵀ."""
    q_a, r_a = torch.linalg.qr(a)  # (…, n, k), (…, k, k)
    q_b, r_b = torch.linalg.qr(b)
    return q_a, r_a @ r_b.mT, q_b


def product_singular_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """σ(A Bᵀ), descending (…, k), for A, B (…, n, k): σ of the k×k core R_a R_bᵀ (module docstring)."""
    return torch.linalg.svdvals(_qr_core(a, b)[1])


def truncated_factors(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_r, B_r), each (…, n, rank): A_r B_rᵀ = U_r S_r V_rᵀ, the best rank-r approximation of A Bᵀ.

    The singular values are split evenly, √S_r on each side, so neither factor carries the scale alone.
    """
    if not 1 <= rank <= a.shape[-1]:
        raise InputError(f"rank must be between 1 and {a.shape[-1]} (the head dimension), got {rank}")
    q_a, core, q_b = _qr_core(a, b)
    u, s, vh = torch.linalg.svd(core)  # A Bᵀ = (Q_a U) S (Q_b V)ᵀ: the SVD of A Bᵀ itself
    root = s[..., :rank].sqrt()[..., None, :]  # (…, 1, r)
    return (q_a @ u[..., :rank]) * root, (q_b @ vh.mT[..., :rank]) * root


def entropy_effective_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """exp(H(p)), p_i = σ_i / Σ_j σ_j (Roy & Vetterli, 2007), over the last axis; 0 for a zero matrix."""
    sigma = singular_values.double()
    total = sigma.sum(-1, keepdim=True)
    p = sigma / total.clamp_min(1e-300)
    entropy = -torch.xlogy(p, p).sum(-1)  # xlogy: 0·log 0 = 0, a zero singular value adds nothing
    return torch.where(total[..., 0] > 0, entropy.exp(), torch.zeros_like(entropy)).to(singular_values.dtype)


def energy_rank(singular_values: torch.Tensor, fraction: float = ENERGY_FRACTION) -> torch.Tensor:
    """The fewest σ (descending, last axis) whose squares hold ``fraction`` of Σσ² = ‖W‖_F²."""
    energy = singular_values.double().square()
    cumulative = energy.cumsum(-1) / energy.sum(-1, keepdim=True).clamp_min(1e-300)
    # 1e-12 of slack: a spectrum of equal values reaches 0.9 exactly and must not need one more.
    return (cumulative < fraction - 1e-12).sum(-1) + 1


@dataclass
class Spectra:
    """Singular values of W_QK and W_OV of every head, (L, H, hd) descending, and their effective ranks."""

    model: str
    qk: torch.Tensor
    ov: torch.Tensor

    @property
    def qk_entropy_rank(self) -> torch.Tensor:
        return entropy_effective_rank(self.qk)

    @property
    def ov_entropy_rank(self) -> torch.Tensor:
        return entropy_effective_rank(self.ov)

    @property
    def qk_energy_rank(self) -> torch.Tensor:
        return energy_rank(self.qk)

    @property
    def ov_energy_rank(self) -> torch.Tensor:
        return energy_rank(self.ov)

    def to_json(self) -> dict:
        def rounded(tensor: torch.Tensor, digits: int = 5) -> list:
            return torch.round(tensor.double(), decimals=digits).tolist()

        return {"model": self.model, "energy_fraction": ENERGY_FRACTION,
                "qk_singular_values": rounded(self.qk), "ov_singular_values": rounded(self.ov),
                "qk_entropy_rank": rounded(self.qk_entropy_rank, 3),
                "ov_entropy_rank": rounded(self.ov_entropy_rank, 3),
                "qk_energy_rank": self.qk_energy_rank.tolist(), "ov_energy_rank": self.ov_energy_rank.tolist()}


@torch.no_grad()
def require_softmax_projections(lm: LanguageModel) -> None:
    """InputError unless every layer is softmax attention with its own W_Q, W_K, W_V: what W_QK = W_Q W_Kᵀ,
    W_OV = W_V W_O and the merge test are about. (A trained attention variant has other parameters or
    scores that are not q·k; for merged-qk, W_QK is a parameter itself: ``blocks[i].attention.w_qk``.)"""
    from attnlab.variants import module_variant

    for layer, block in enumerate(lm.model.blocks):
        if type(block.attention) is not MultiHeadAttention:
            variant = module_variant(block.attention)
            raise InputError(f"circuits reads W_Q, W_K, W_V of softmax attention; layer {layer} of {lm.name} computes "
                             f"{variant} attention, whose projections or scores are not those (train or load a "
                             f"softmax model)")


def head_spectra(lm: LanguageModel) -> Spectra:
    """σ(W_QK^h) and σ(W_OV^h) of every head of every layer (weights only, no bias row)."""
    require_softmax_projections(lm)
    qk, ov = [], []
    for block in lm.model.blocks:
        qk.append(product_singular_values(*qk_factors(block.attention)))
        ov.append(product_singular_values(*ov_factors(block.attention)))
    return Spectra(model=lm.name, qk=torch.stack(qk).float(), ov=torch.stack(ov).float())


def merge_obstacles(config) -> list[str]:
    """Why x̃ W̃_QK x̃ᵀ cannot equal the model's score for this architecture; [] where it can."""
    reasons = []
    if config.positions == "rope":
        reasons.append(ROPE_REASON)
    if config.qk_norm:
        reasons.append(QK_NORM_REASON)
    return reasons


@dataclass
class Exactness:
    """Merged scores x̃ W̃_QK x̃ᵀ against the model's own q·k, per layer, on one text.

    Errors are over the (query, key) pairs the mask allows. ``pattern_tv``: mean over query rows of the
    total-variation distance ½ Σ_j |p_ij − p'_ij| between the model's attention and the one the merged
    scores would give; ``argmax_changed``: the fraction of query rows whose most-attended key changes.
    """

    model: str
    n_tokens: int
    obstacles: list[str]
    max_abs_error: list[float]
    relative_error: list[float]
    pattern_tv: list[float]
    argmax_changed: list[float]
    overall_relative_error: float

    @property
    def exact(self) -> bool:
        return self.overall_relative_error < EXACT_TOLERANCE

    def verdict(self) -> str:
        error = f"relative error {self.overall_relative_error:.2g}"
        if self.exact:
            return (f"exact: one W̃_QK per head reproduces every score to float rounding ({error}); positions are "
                    f"added to x before attention, so q·k is a bilinear form in x̃")
        if self.obstacles:
            return f"not exact ({error}): " + "; ".join(self.obstacles)
        return f"not exact ({error}) although nothing in the architecture should prevent it: please report this"

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"exact": self.exact, "verdict": self.verdict(),
                                           "tolerance": EXACT_TOLERANCE}


@torch.no_grad()
def merge_exactness(lm: LanguageModel, text: str) -> Exactness:
    """Premultiply W̃_QK per head and compare x̃ W̃_QK x̃ᵀ with the scores the model computes on ``text``.

    The merged product is taken in float64, so what remains for an absolute-position model is the
    model's own fp32 rounding.
    """
    require_softmax_projections(lm)
    ids = lm._input_ids(text)
    config = lm.config
    capture = Capture(points=("input", "scores", "masked_scores", "probs"))
    lm.model(torch.tensor([ids]), capture=capture, return_hidden=True)
    floor = torch.finfo(torch.float32).min / 2
    max_abs, relative, tv, changed = [], [], [], []
    error_sq = reference_sq = 0.0
    for layer, block in enumerate(lm.model.blocks):
        attention = block.attention
        x = capture.get("input", layer)[0].double()  # (T, d)
        x_tilde = torch.cat([x, x.new_ones(len(x), 1)], dim=1)  # (T, d+1): [x, 1]
        w_q, w_k = qk_factors(attention, with_bias=True)  # (H, d+1, hd)
        w_qk = w_q @ w_k.mT  # (H, d+1, d+1): premultiplied once, used for every pair
        merged = x_tilde @ w_qk @ x_tilde.T  # (H, T, T): x̃_i W̃_QK x̃_jᵀ
        scores = capture.get("scores", layer)[0].double()  # (H, T, T): the model's q·k
        allowed = capture.get("masked_scores", layer)[0] > floor  # (H, T, T)
        delta = (merged - scores)[allowed]
        max_abs.append(float(delta.abs().max()))
        layer_error_sq, layer_reference_sq = float(delta.square().sum()), float(scores[allowed].square().sum())
        relative.append(math.sqrt(layer_error_sq / max(layer_reference_sq, 1e-300)))
        error_sq, reference_sq = error_sq + layer_error_sq, reference_sq + layer_reference_sq

        logits = merged * attention.scale
        if attention.softcap is not None:
            logits = attention.softcap * torch.tanh(logits / attention.softcap)
        merged_probs = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)
        probs = capture.get("probs", layer)[0].double()
        tv.append(float(0.5 * (merged_probs - probs).abs().sum(-1).mean()))
        changed.append(float((merged_probs.argmax(-1) != probs.argmax(-1)).double().mean()))
    return Exactness(model=lm.name, n_tokens=len(ids), obstacles=merge_obstacles(config), max_abs_error=max_abs,
                     relative_error=relative, pattern_tv=tv, argmax_changed=changed,
                     overall_relative_error=math.sqrt(error_sq / max(reference_sq, 1e-300)))


def qk_parameters(config, rank: int | None = None) -> int:
    """Numbers in W_Q and W_K (and their biases) of all layers: as the model stores them (rank None), or
    as rank-r factors per query head, 2·r·(d + bias) each, if stored without padding."""
    rows = config.d_model + int(config.qkv_bias)
    if rank is None:
        return config.n_layers * rows * config.head_dim * (config.n_heads + config.n_kv_heads)
    return config.n_layers * config.n_heads * 2 * rank * rows


@torch.no_grad()
def factorised_model(lm: LanguageModel, rank: int) -> LanguageModel:
    """``lm`` with every head's W̃_QK replaced by its best rank-r approximation, as a model that runs.

    Per query head, W̃_Q' = U_r S_r^{1/2} and W̃_K' = V_r S_r^{1/2}, padded with zero columns to head_dim
    (so the attention scale and the code path stay the same); the weights are the first d rows, the bias
    the last where the model has biases. Each query head now needs its own key projection, so the
    config gets n_kv_heads = n_heads and W_V is repeated per query head (which changes nothing).
    Tensors that do not change are shared with ``lm``, not copied. For an absolute-position model
    rank = head_dim gives back the original model; with RoPE it does not, since the rotation then acts
    on the new basis of q and k — the same reason the merge is not exact.
    """
    require_softmax_projections(lm)
    config = lm.config
    hd, d, n_heads = config.head_dim, config.d_model, config.n_heads
    if not 1 <= rank <= hd:
        raise InputError(f"rank must be between 1 and {hd} ({lm.name}'s head dimension), got {rank}")
    state = dict(lm.model.state_dict())
    group = n_heads // config.n_kv_heads
    for layer, block in enumerate(lm.model.blocks):
        attention, prefix = block.attention, f"blocks.{layer}.attention."
        a_r, b_r = truncated_factors(*qk_factors(attention, with_bias=config.qkv_bias), rank)  # (H, d(+1), r)
        for name, factor in (("w_q", a_r), ("w_k", b_r)):
            padded = torch.nn.functional.pad(factor, (0, hd - rank)).float()  # (H, d(+1), hd)
            state[prefix + name + ".weight"] = padded[:, :d].mT.reshape(n_heads * hd, d).contiguous()
            if config.qkv_bias:
                state[prefix + name + ".bias"] = padded[:, d].reshape(n_heads * hd).contiguous()
        w_v = attention.w_v.weight.detach().reshape(config.n_kv_heads, hd, d)
        state[prefix + "w_v.weight"] = w_v.repeat_interleave(group, dim=0).reshape(n_heads * hd, d).contiguous()
        if config.qkv_bias:
            b_v = attention.w_v.bias.detach().reshape(config.n_kv_heads, hd)
            state[prefix + "w_v.bias"] = b_v.repeat_interleave(group, dim=0).reshape(n_heads * hd).contiguous()
    new_config = dataclasses.replace(config, n_kv_heads=n_heads)
    model = build_model(new_config, state, f"{lm.name} with rank-{rank} W_QK")
    return LanguageModel(model, lm.tokenizer, f"{lm.name} (W_QK rank {rank})")


def parse_ranks(text: str, head_dim: int | None = None) -> list[int]:
    """"64,32,16" → [64, 32, 16] (descending, no repeats); InputError on anything else.

    Without ``head_dim`` only the form is checked (before a model is loaded), with it the range too.
    """
    ranks = []
    for piece in text.split(","):
        piece = piece.strip()
        try:
            rank = int(piece)
        except ValueError:
            raise InputError(f"--ranks: {piece!r} is not a whole number; give ranks like 64,32,16") from None
        if rank < 1:
            raise InputError(f"--ranks: rank {rank} must be at least 1")
        if head_dim is not None and rank > head_dim:
            raise InputError(f"--ranks: rank {rank} exceeds the model's head dimension {head_dim} "
                             f"(W_QK of a head has rank ≤ {head_dim})")
        ranks.append(rank)
    return sorted(set(ranks), reverse=True)


def default_ranks(head_dim: int) -> list[int]:
    """head_dim, hd/2, hd/4, hd/8 (the ones ≥ 1)."""
    return sorted({max(1, head_dim // divisor) for divisor in (1, 2, 4, 8)}, reverse=True)


@dataclass
class RankPerplexity:
    """Perplexity of the original model and of its rank-r W_QK versions on the same held-out tokens."""

    original: Perplexity
    by_rank: dict[int, Perplexity]

    def change(self, rank: int) -> float:
        """Perplexity change vs the original, in %."""
        return 100.0 * (self.by_rank[rank].perplexity / self.original.perplexity - 1.0)

    def to_json(self) -> dict:
        return {"original": self.original.to_json(),
                "ranks": [{"rank": rank, "change_percent": self.change(rank)} | result.to_json()
                          for rank, result in self.by_rank.items()]}


def rank_perplexities(lm: LanguageModel, ranks: Sequence[int], text: str, *, source: str,
                      context: int | None = None, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                      say: Callable[[str], None] = lambda message: None) -> RankPerplexity:
    """Perplexity on ``text`` in non-overlapping windows of ``context`` tokens (default min(512, the
    model's)), for the model and for each rank. Windows do not overlap so each model costs only
    max_tokens / context forward passes; all models see the same windows, so the comparison is fair."""
    context = min(DEFAULT_CONTEXT, lm.config.context_length) if context is None else context

    def score(model: LanguageModel) -> Perplexity:
        return perplexity(model, text, context=context, stride=context, max_tokens=max_tokens, source=source,
                          progress=True)

    say(f"perplexity of the original model on {source}…")
    original = score(lm)
    by_rank = {}
    for rank in ranks:
        say(f"perplexity with W_QK at rank {rank}…")
        by_rank[rank] = score(factorised_model(lm, rank))
    return RankPerplexity(original=original, by_rank=by_rank)


@dataclass
class CircuitsReport:
    """Everything ``attnlab circuits`` shows: spectra, exactness, perplexity vs rank (None for encoders)."""

    model: str
    spectra: Spectra
    exactness: Exactness
    perplexity: RankPerplexity | None
    perplexity_note: str | None = None

    def to_json(self) -> dict:
        return {"model": self.model, "spectra": self.spectra.to_json(), "exactness": self.exactness.to_json(),
                "perplexity": None if self.perplexity is None else self.perplexity.to_json(),
                "perplexity_note": self.perplexity_note}

    def plot(self):
        """(a, b) σ_i/σ_1 of W_QK and W_OV, a line per head coloured by layer, log y;
        (c, d) layers × heads heatmaps of the entropy effective rank of each."""
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        from attnlab.inspect.plots import new_figure

        spectra = self.spectra
        n_layers, n_heads, head_dim = spectra.qk.shape
        fig = new_figure(11, 4.2 + 0.12 * n_layers)
        axes = fig.subplots(2, 2, height_ratios=[1.0, max(0.6, 0.045 * n_layers)])
        colours = colormaps["viridis"]
        layer_scale = Normalize(0, max(n_layers - 1, 1))
        index = torch.arange(1, head_dim + 1)
        for ax, sigma, name in ((axes[0, 0], spectra.qk, "W_QK"), (axes[0, 1], spectra.ov, "W_OV")):
            normalised = sigma / sigma[..., :1].clamp_min(1e-30)
            for layer in range(n_layers):
                for head in range(n_heads):
                    ax.plot(index, normalised[layer, head].clamp_min(1e-8), color=colours(layer_scale(layer)),
                            linewidth=0.6, alpha=0.6)
            ax.set_yscale("log")
            ax.set_xlabel("singular value index i")
            ax.set_ylabel("σ_i / σ_1")
            ax.set_title(f"({'a' if name == 'W_QK' else 'b'}) spectrum of {name} per head", fontsize=9)
            fig.colorbar(ScalarMappable(layer_scale, colours), ax=ax, label="layer")
        for ax, rank, name in ((axes[1, 0], spectra.qk_entropy_rank, "W_QK"),
                               (axes[1, 1], spectra.ov_entropy_rank, "W_OV")):
            image = ax.imshow(rank.numpy(), cmap="magma", vmin=0, vmax=head_dim, aspect="auto",
                              interpolation="nearest")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_xticks(range(n_heads), [str(h) for h in range(n_heads)], fontsize=7)
            ax.set_title(f"({'c' if name == 'W_QK' else 'd'}) entropy effective rank of {name} "
                         f"(of {head_dim})", fontsize=9)
            fig.colorbar(image, ax=ax, label="exp H(σ/Σσ)")
        fig.suptitle(f"{self.model}: W_QK and W_OV of every head · merge "
                     f"{'exact' if self.exactness.exact else 'not exact'} "
                     f"(relative error {self.exactness.overall_relative_error:.2g})", fontsize=10)
        return fig


def analyse_circuits(lm: LanguageModel, *, text: str, ranks: Sequence[int] | None = None,
                     eval_text: str | None = None, eval_source: str = "text", context: int | None = None,
                     max_tokens: int | None = DEFAULT_MAX_TOKENS, with_perplexity: bool = True,
                     say: Callable[[str], None] = lambda message: None) -> CircuitsReport:
    """Spectra and merge exactness of every head, and perplexity vs W_QK rank on ``eval_text``.

    The perplexity part is skipped (with a note) for encoders, without ``eval_text``, or when not asked.
    """
    config = lm.config
    require_softmax_projections(lm)  # before any message: a refusal is one line
    say(f"singular values of {config.n_layers * config.n_heads} heads' W_QK and W_OV…")
    spectra = head_spectra(lm)
    say("merged W_QK against the model's own scores…")
    exactness = merge_exactness(lm, text)
    note, result = None, None
    if not with_perplexity:
        note = "perplexity skipped (--no-perplexity)"
    elif not config.lm_head or not config.causal:
        note = (f"perplexity skipped: {lm.name} is an encoder ({config.family}) with no next-token predictions; "
                f"spectra and exactness above still apply")
    elif eval_text is None:
        note = "perplexity skipped: no held-out text"
    else:
        ranks = default_ranks(config.head_dim) if ranks is None else list(ranks)
        result = rank_perplexities(lm, ranks, eval_text, source=eval_source, context=context,
                                   max_tokens=max_tokens, say=say)
    return CircuitsReport(model=lm.name, spectra=spectra, exactness=exactness, perplexity=result,
                          perplexity_note=note)
