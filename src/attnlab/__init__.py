"""attnlab: transformer attention and the language models built on it, from scratch in PyTorch.

    import attnlab
    lm = attnlab.load()                      # the embedded SmolLM2-135M-Instruct
    lm.generate("What is the capital of France?", chat=True)
"""

from attnlab.capture import Capture
from attnlab.config import ModelConfig
from attnlab.errors import AttnlabError
from attnlab.lm import LanguageModel, load
from attnlab.model import Transformer

__all__ = ["AttnlabError", "Capture", "LanguageModel", "ModelConfig", "Transformer", "load"]
__version__ = "0.1.0"
