"""Typed errors. Each carries a message that names the problem and, where there is one, the fix.

The CLI prints ``attnlab: error: <message>`` on one line and exits with status 2 for any of these,
so a message must make sense on its own, without a traceback.
"""


class AttnlabError(Exception):
    """Base class for every error attnlab raises on purpose (bad input, missing files...)."""


class ModelNotFoundError(AttnlabError):
    """A model source (name, file, folder) does not exist or its package is not installed."""


class WeightsFormatError(AttnlabError):
    """A weights file is truncated, corrupt, of an unknown architecture/quant type, or mis-shaped."""


class TokenizerError(AttnlabError):
    """A tokenizer could not be built or cannot encode/decode what was asked."""


class InputError(AttnlabError):
    """User input is invalid: empty prompt, prompt longer than the context, bad sampling values."""
