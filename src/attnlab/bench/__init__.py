"""``attnlab bench``: attnlab's modes against transformers and llama.cpp, on one model, in one run.

What is measured, for each system (batch 1, greedy, ``--threads`` threads, the same token ids for all):

* load (s)               -- the call that loads the model, until it is ready to generate.
* start → 1st token (s)  -- wall time from the moment the parent spawns the system's process to its first
                            generated token after the short prompt: interpreter start, imports, load, prefill,
                            first step. When a start builds something (a GGUF conversion, a compiled artefact
                            cached on disk), the system is started again: the table shows that cached start,
                            the notes the first one.
* prefill (tokens/s)     -- prompt length / time to the first new token after a ``--prompt-tokens`` prompt
                            (an English paragraph repeated, encoded and cut to exactly that many ids).
* decode (tokens/s)      -- (N - 1) / (time to generate N tokens - time to generate 1 token), which takes the
                            prefill out; after the short chat prompt ("What is the capital of France?", 37
                            tokens for SmolLM2) and after the long prompt. N = ``--new-tokens``.
* peak RSS (MB)          -- ``ru_maxrss`` of the system's own process: imports, load and generation together.
* greedy agreement       -- each attnlab mode and peer against attnlab fp32, free-running: every system
                            generates its own N greedy tokens from the same prompt; the table shows at how many
                            of the N positions its token equals fp32's, and the length of the common prefix.

Systems: attnlab in each mode ``--modes`` asks for (those the installed attnlab or this machine cannot run
are listed as not available, with the reason), transformers fp32 (``model.generate``, default attention) and
llama.cpp through llama-cpp-python on the GGUF file itself (its own quantisation). Each timed generation is
repeated ``--repeats`` times after a warm-up round; the table shows medians, the ratios attnlab / each peer,
and issue 6's targets for the default mode, pass or fail. Only ratios measured within one run mean much.
"""

from attnlab.bench.report import TARGETS, evaluate_targets, render
from attnlab.bench.run import (
    PEERS,
    BenchError,
    BenchOptions,
    agreement,
    agreements,
    cpu_model,
    plan_bench,
    rates,
    run_bench,
    write_json_atomically,
)

__all__ = ["PEERS", "TARGETS", "BenchError", "BenchOptions", "agreement", "agreements", "cpu_model",
           "evaluate_targets", "plan_bench", "rates", "render", "run_bench", "write_json_atomically"]
