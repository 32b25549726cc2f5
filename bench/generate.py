"""Generation benchmark: now the ``attnlab bench`` command (``src/attnlab/bench/``); this script forwards to it.

    .venv/bin/attnlab bench                                   # every mode, transformers and llama.cpp, 3 repeats
    .venv/bin/python bench/generate.py --modes fp32 --peers transformers --json out.json   # the same, as a script

It keeps the names ``bench/train.py`` imports from here.
"""

import sys

from attnlab.bench.run import cpu_model, write_json_atomically  # noqa: F401  (used by bench/train.py)


def positive_int(text: str) -> int:
    """argparse type for bench/train.py: an integer ≥ 1."""
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


if __name__ == "__main__":
    from attnlab.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
