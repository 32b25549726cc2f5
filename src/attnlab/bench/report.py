"""``attnlab bench``'s targets and tables: ratios against each peer, the bars of issue 6, pass or fail."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """A bar an attnlab mode must clear: a ratio against a peer's same metric, or an absolute value."""

    name: str
    label: str
    metric: str  # key in a system's results ("agreement": its greedy agreement fraction with attnlab fp32)
    peer: str | None  # the ratio is against this peer; None: the value itself is compared with the bar
    bar: float
    higher_is_better: bool

    @property
    def bar_text(self) -> str:
        sign = "≥" if self.higher_is_better else "≤"
        if self.peer is not None:
            return f"{sign} {self.bar:g}×"
        return f"{sign} {self.bar:.0%}" if self.metric == "agreement" else f"{sign} {self.bar:g} s"

    def passes(self, value: float) -> bool:
        return value >= self.bar if self.higher_is_better else value <= self.bar


# Issue 6's targets (SmolLM2-135M, batch 1, 2 threads, one run), checked for the default mode.
TARGETS = (
    Target("decode_short_vs_llama", "decode @ short ctx vs llama.cpp", "decode_short_tok_s", "llama.cpp", 1.5, True),
    Target("decode_long_vs_llama", "decode @ long ctx vs llama.cpp", "decode_long_tok_s", "llama.cpp", 1.5, True),
    Target("decode_short_vs_transformers", "decode @ short ctx vs transformers fp32", "decode_short_tok_s",
           "transformers", 4.0, True),
    Target("decode_long_vs_transformers", "decode @ long ctx vs transformers fp32", "decode_long_tok_s",
           "transformers", 4.0, True),
    Target("prefill_vs_llama", "prefill vs llama.cpp", "prefill_tok_s", "llama.cpp", 2.0, True),
    Target("rss_vs_llama", "peak RSS vs llama.cpp", "peak_rss_mb", "llama.cpp", 3.0, False),
    Target("rss_vs_transformers", "peak RSS vs transformers", "peak_rss_mb", "transformers", 0.5, False),
    Target("agreement", "greedy tokens = fp32 (per step, teacher-forced, both prompts)", "agreement", None, 0.99,
           True),
    Target("ttft", "start → first token, cached start", "ttft_s", None, 3.0, False),
)

# (key, column title, number format, higher is better)
METRICS = (
    ("load_s", "load (s)", "{:.2f}", False),
    ("ttft_s", "start → 1st token (s)", "{:.2f}", False),
    ("prefill_tok_s", "prefill {prompt} tok (tok/s)", "{:.0f}", True),
    ("decode_short_tok_s", "decode @ {short} (tok/s)", "{:.1f}", True),
    ("decode_long_tok_s", "decode @ {prompt} (tok/s)", "{:.1f}", True),
    ("peak_rss_mb", "peak RSS (MB)", "{:.0f}", False),
)
RATIO_METRICS = ("prefill_tok_s", "decode_short_tok_s", "decode_long_tok_s", "peak_rss_mb", "ttft_s", "load_s")


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs; None when either is missing or the peer's value is zero."""
    if ours is None or not theirs:
        return None
    return ours / theirs


def attnlab_labels(systems: dict[str, dict[str, Any]]) -> list[str]:
    return [label for label, result in systems.items() if result["system"] == "attnlab"]


def target_value(target: Target, label: str, systems: dict[str, dict[str, Any]]) -> tuple[float | None, str | None]:
    """The number ``target`` judges for system ``label``, or None and why there is none."""
    result = systems[label]
    if target.metric == "agreement":
        if result["mode"] == "fp32":
            return 1.0, "is the reference"
        if result.get("teacher_forced") is None:
            return None, "no fp32 reference in this run"
        return result["teacher_forced"]["fraction"], None
    if target.peer is None:
        return result.get(target.metric), None
    if target.peer not in systems:
        return None, f"{target.peer} not in this run"
    return ratio(result.get(target.metric), systems[target.peer].get(target.metric)), None


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target for every attnlab mode in the run: value, passed (None when unmeasured), and why not."""
    systems = results["systems"]
    rows = []
    for target in TARGETS:
        values = {}
        for label in attnlab_labels(systems):
            value, why = target_value(target, label, systems)
            values[label] = {"value": value, "passed": None if value is None else target.passes(value), "why": why}
        rows.append({"name": target.name, "label": target.label, "bar": target.bar_text, "values": values})
    return rows


def agreement_cell(agreement: dict[str, Any] | None, is_reference: bool) -> str:
    if is_reference:
        return "reference"
    if agreement is None:
        return "—"
    colour = "green" if agreement["matched"] == agreement["steps"] else "yellow"
    return f"[{colour}]{agreement['matched']}/{agreement['steps']}[/{colour}], prefix {agreement['prefix']}"


def coloured_ratio(value: float | None, higher_is_better: bool, target: Target | None) -> str:
    if value is None:
        return "—"
    if target is not None:
        ok = target.passes(value)
        colour = "green" if ok else "red"
        return f"[{colour}]{value:.2f}× {'✓' if ok else '✗'}[/{colour}]"
    colour = "green" if (value > 1 if higher_is_better else value < 1) else "red"
    return f"[{colour}]{value:.2f}×[/{colour}]"


def system_title(label: str, result: dict[str, Any]) -> str:
    if result["system"] == "attnlab":
        return label + (" (default)" if result.get("default") else "")
    if result["system"] == "transformers":
        return f"transformers {result.get('mode', 'fp32')} ({result.get('attn_implementation', '?')})"
    return f"llama.cpp {result.get('mode', '')}".strip()


def render(results: dict[str, Any], console: Any = None) -> None:
    """Print the measurements, the ratios against each peer and the targets (rich tables) to ``console``."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    settings, systems = results["settings"], results["systems"]
    names = {"prompt": settings["prompt_tokens"], "short": results["prompt_lengths"].get("short", "?")}
    higher = {key: better for key, _, _, better in METRICS}
    new = settings["new_tokens"]

    table = Table(title=f"{settings['model']}: batch 1, {settings['threads']} threads, greedy, {new} new tokens, "
                        f"median of {settings['repeats']}",
                  caption="start → 1st token: wall time from process start (imports, load, prefill, first step) to "
                          "the first token of the short prompt")
    table.add_column("system")
    for _, title, _, _ in METRICS:
        table.add_column(title.format(**names), justify="right")
    table.add_column(f"= fp32 @ {names['short']}", justify="right")
    table.add_column(f"= fp32 @ {names['prompt']}", justify="right")
    for label, result in systems.items():
        cells = [fmt.format(result[key]) if result.get(key) is not None else "—" for key, _, fmt, _ in METRICS]
        agree = result.get("agreement")
        is_reference = label == results.get("reference")
        table.add_row(system_title(label, result), *cells,
                      agreement_cell(agree and agree["short"], is_reference),
                      agreement_cell(agree and agree["long"], is_reference))
    console.print(table)

    peers = [label for label, result in systems.items() if result["system"] != "attnlab"]
    ours = attnlab_labels(systems)
    bars = {(t.metric, t.peer): t for t in TARGETS if t.peer is not None}
    short_titles = {"prefill_tok_s": "prefill", "decode_short_tok_s": f"decode @ {names['short']}",
                    "decode_long_tok_s": f"decode @ {names['prompt']}", "peak_rss_mb": "peak RSS",
                    "ttft_s": "start → 1st token", "load_s": "load"}
    for peer in peers if ours else ():
        ratios = Table(title=f"attnlab / {system_title(peer, systems[peer])}, same run; ✓ / ✗: against the target bar",
                       caption="higher is better for tok/s; lower for RSS, start and load")
        ratios.add_column("attnlab")
        for metric in RATIO_METRICS:
            bar = bars.get((metric, peer))
            ratios.add_column(short_titles[metric] + (f" ({bar.bar_text})" if bar else ""), justify="right")
        for label in ours:
            cells = [coloured_ratio(ratio(systems[label].get(metric), systems[peer].get(metric)), higher[metric],
                                    bars.get((metric, peer))) for metric in RATIO_METRICS]
            ratios.add_row(system_title(label, systems[label]), *cells)
        console.print(ratios)

    if ours:
        targets = Table(title="targets (issue 6), judged for the default mode; the other modes for comparison")
        targets.add_column("target")
        targets.add_column("bar", justify="right")
        for label in ours:
            targets.add_column(system_title(label, systems[label]), justify="right")
        default = next((label for label in ours if systems[label].get("default")), None)
        targets.add_column("default mode")
        by_name = {t.name: t for t in TARGETS}
        for row in results["targets"]:
            target = by_name[row["name"]]
            cells = [target_cell(target, row["values"][label]) for label in ours]
            verdict = row["values"].get(default) if default else None
            targets.add_row(row["label"], row["bar"], *cells, verdict_cell(verdict))
        console.print(targets)

    if results.get("batch"):  # the default mode's throughput against batch size
        settings = results["settings"]
        rows = results["batch"]
        render_rows(console, f"batch throughput, {rows[0]['system']}: {rows[0]['sequences']} prompts of 4-18 tokens "
                             f"(left-padded) × {settings['new_tokens']} greedy tokens, in batches of each size, "
                             f"prefill included, median of {settings['repeats']}", rows)

    for line in notes(results):
        console.print(line)


def target_cell(target: Target, value: dict[str, Any]) -> str:
    if value["value"] is None:
        return f"[dim]n/a ({value['why']})[/dim]"
    number = value["value"]
    if target.metric == "agreement":
        text = f"{number:.1%}"
    elif target.peer is not None:
        text = f"{number:.2f}×"
    else:
        text = f"{number:.2f} s"
    colour = "green" if value["passed"] else "red"
    return f"[{colour}]{text} {'✓' if value['passed'] else '✗'}[/{colour}]"


def verdict_cell(value: dict[str, Any] | None) -> str:
    if value is None or value["passed"] is None:
        return "[dim]n/a[/dim]"
    return "[green]PASS[/green]" if value["passed"] else "[red]FAIL[/red]"


def render_rows(console: Any, title: str, rows: Sequence[dict[str, Any]]) -> None:
    """A table of flat dicts, one column per key (for rows other parts of the benchmark add)."""
    from rich.table import Table

    table = Table(title=title)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    for column in columns:
        table.add_column(column, justify="left" if column == "system" else "right")
    for row in rows:
        table.add_row(*(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns))
    console.print(table)


def notes(results: dict[str, Any]) -> list[str]:
    """The lines printed under the tables: what was skipped, how agreement is counted, the machine, warnings."""
    settings, systems, machine = results["settings"], results["systems"], results["machine"]
    by_reason: dict[str, list[str]] = {}
    for label, reason in results["unavailable"].items():
        by_reason.setdefault(reason, []).append(label.removeprefix("attnlab "))
    lines = [f"attnlab {', '.join(modes)}: not available: {reason}" for reason, modes in by_reason.items()]
    lines += [f"{peer}: skipped ({reason})" for peer, reason in results["skipped"].items()]
    for label, result in systems.items():
        first = result.get("first_start")
        if first:
            lines.append(f"{label}: its first start built and cached an artefact: {first['ttft_s']:.1f} s to first "
                         f"token (load {first['load_s']:.1f} s); the table shows the next, cached start")
    if results.get("reference"):
        lines.append(f"greedy agreement = fp32 (table): {results['agreement_method']} "
                     f"({settings['new_tokens']} tokens after each prompt)")
        lines.append(f"greedy agreement (target): {results['teacher_forced_method']}")
    else:
        lines.append("greedy agreement: not measured (attnlab fp32, the reference, is not in this run)")
    lines.extend(results["notes"])
    if results.get("short_prompt_chat") is False:
        lines.append("note: the model has no chat template; the short prompt is the question as plain text")
    versions = ", ".join(f"{label} {version}" for label, version in machine["versions"].items()
                         if version and not label.startswith("attnlab"))
    lines.append(f"machine: {machine['cpu']}, {machine['cpus']} CPUs, {machine['threads']} threads, "
                 f"torch {machine['torch']}, python {machine['python']}" + (f", {versions}" if versions else ""))
    busy = machine.get("other_cpus")
    if busy is not None and busy > 0.2:
        lines.append(f"[yellow]warning: other processes kept {busy:.1f} CPUs busy on average while timing; the "
                     f"numbers are unreliable, the ratios less so: rerun on a quieter machine[/yellow]")
    return lines
