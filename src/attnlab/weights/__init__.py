"""Weight loaders: each turns a file format into (ModelConfig, state dict in attnlab's names)."""

import torch

from attnlab.config import ModelConfig
from attnlab.errors import WeightsFormatError
from attnlab.model import Transformer


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
    # Non-persistent buffers (RoPE frequencies) were created on meta: rebuild them for real.
    if config.positions == "rope":
        from attnlab.positions import RotaryEmbedding

        model.rope_global = RotaryEmbedding(config.head_dim, config.rope_theta)
        model.rope_local = RotaryEmbedding(config.head_dim, config.rope_theta_local or config.rope_theta)
    return model.eval()
