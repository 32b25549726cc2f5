"""Weight loaders: each turns a file format into (ModelConfig, state dict in attnlab's names)."""

import torch
from torch import nn

from attnlab.config import ModelConfig
from attnlab.errors import WeightsFormatError
from attnlab.model import Transformer, rebuild_rope_tables


def build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor], source: str) -> Transformer:
    """A Transformer holding ``state_dict``, after checking every name and shape against the config.

    The model is built on the meta device and the tensors are assigned, not copied: loading never
    holds two copies of the weights.
    """
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        raise WeightsFormatError(f"{source}: missing tensor(s) {', '.join(missing[:5])}"
                                 f"{' …' if len(missing) > 5 else ''}")
    if unexpected:
        raise WeightsFormatError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}"
                                 f"{' …' if len(unexpected) > 5 else ''}")
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise WeightsFormatError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(expected[name].shape)} for this config")
    model.load_state_dict({name: t.float() for name, t in state_dict.items()}, assign=True)
    rebuild_rope_tables(model)  # non-persistent buffers were created on meta
    store_matrices_input_major(model)
    return model.eval()


def store_matrices_input_major(model: Transformer) -> None:
    """Keep every weight matrix's (out, in) shape but lay its numbers out in memory as (in, out).

    Why: decoding one token is a matrix-vector product y = x·Wᵀ per matrix, bound by how fast the
    weights stream from memory, and CPU BLAS streams the (in, out) order faster: measured here
    ~1.2× on the layer matrices and ~2× on the 49k-row LM head (see bench/generate.py). Names,
    shapes and results are unchanged; only the strides differ (checkpoints are saved contiguous).
    """
    matrices = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if model.config.lm_head and model.config.tie_embeddings:  # the embedding is also the LM head
        matrices.append(model.token_embedding)
    for module in matrices:
        weight = module.weight
        if weight.t().is_contiguous():  # already so (a checkpoint saved this way): nothing to copy
            continue
        module.weight = nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=weight.requires_grad)
