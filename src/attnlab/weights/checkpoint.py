"""attnlab's own checkpoint format: a folder that never executes code when loaded.

    attnlab.json       {"format": "attnlab-checkpoint", "version": 1, "config": {...}, "tokenizer": {...},
                        "stored_transposed": [names]}
    model.safetensors  the weights in attnlab's parameter names
    (tokenizer files)  whatever the tokenizer's ``save`` wrote (tokenizer.json, chars.json…)

The folder is written under a temporary name and renamed into place, so a reader never sees half
a checkpoint. The same format caches GGUF files after their first (slow) dequantisation.

Matrices that live in memory as (in, out) (see ``store_matrices_input_major``) are written as their
transpose and listed in ``stored_transposed``; loading takes ``.t()`` again, a view. That way the
memory-mapped file is used as it is, with no copy of the weights at load time.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from attnlab.config import ModelConfig
from attnlab.errors import WeightsFormatError

FORMAT_NAME = "attnlab-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "attnlab.json"
WEIGHTS = "model.safetensors"


def is_checkpoint(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def save_checkpoint(folder: Path, config: ModelConfig, state_dict: dict[str, torch.Tensor], tokenizer,
                    extra: dict | None = None, write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint folder atomically (temp folder + rename). ``tokenizer`` may be None;
    ``write_extra(staging_folder)`` adds files (a trainer's optimizer state) before the rename."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        tensors, transposed = {}, []
        for name, tensor in state_dict.items():
            tensor = tensor.detach()
            if tensor.dim() == 2 and not tensor.is_contiguous() and tensor.t().is_contiguous():
                tensor = tensor.t()
                transposed.append(name)
            tensors[name] = tensor.contiguous()
        save_file(tensors, str(staging / WEIGHTS))
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": config.to_dict(),
                    "tokenizer": tokenizer.save(staging) if tokenizer is not None else None,
                    "stored_transposed": transposed} | (extra or {})
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if write_extra is not None:
            write_extra(staging)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old.{os.getpid()}")
            os.replace(folder, old)
            os.replace(staging, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightsFormatError(f"{path}: unreadable checkpoint manifest ({error})") from None
    if manifest.get("format") != FORMAT_NAME:
        raise WeightsFormatError(f"{path}: field format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise WeightsFormatError(f"{path}: field version is {manifest.get('version')!r}, expected {FORMAT_VERSION}")
    if not isinstance(manifest.get("config"), dict):
        raise WeightsFormatError(f"{path}: field config is missing or not an object")
    return manifest


def load_checkpoint(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(config, state dict, manifest) of a checkpoint folder."""
    manifest = read_manifest(folder)
    config = ModelConfig.from_dict(manifest["config"])
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise WeightsFormatError(f"{folder}: {WEIGHTS} is missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise WeightsFormatError(f"{weights}: corrupt or truncated safetensors file ({error})") from None
    transposed = manifest.get("stored_transposed", [])
    if not isinstance(transposed, list) or not all(isinstance(name, str) for name in transposed):
        raise WeightsFormatError(f"{folder / MANIFEST}: field stored_transposed must be a list of tensor names")
    for name in transposed:
        if name not in state or state[name].dim() != 2:
            raise WeightsFormatError(f"{folder / MANIFEST}: stored_transposed names {name!r}, "
                                     f"which is not a matrix in {WEIGHTS}")
        state[name] = state[name].t()
    return config, state, manifest
