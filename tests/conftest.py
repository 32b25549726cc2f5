"""Shared fixtures: tiny random Hugging Face models (the oracle) saved to disk, and the real models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2_path():
    from attnlab.errors import ModelNotFoundError
    from attnlab.weights.registry import resolve_named_model

    try:
        return resolve_named_model("smollm2-135m-instruct")
    except ModelNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def artifacts_dir():
    """Where tests keep what a person may want to look at afterwards (browser screenshots):
    ``$ATTNLAB_TEST_ARTIFACTS``, else ``test-artifacts/`` in the repository (git-ignored)."""
    from pathlib import Path

    folder = Path(os.environ.get("ATTNLAB_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder
