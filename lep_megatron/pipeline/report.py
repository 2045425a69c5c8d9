"""The pipeline's final report: report.md + PNG plots in the run directory, the table printed.

Reads what the steps wrote: pretrain/metrics.jsonl (losses), tokenizer_report.json (characters
per token of the original and the new tokenizer) and eval/<model>/report.json (per-character
perplexity, task scores)."""
import json
import math
from pathlib import Path
from typing import Dict, List, Optional

REPORT = "report.md"
# the order models appear in, and what each row is
MODEL_ROWS = {
    "base": "base model (original tokenizer)",
    "instruct": "instruct model (original tokenizer)",
    "adapted_base": "base + new tokenizer, embeddings trained (LEP donor)",
    "lep_swap": "instruct + LEP swap",
    "lep_overlap": "instruct + LEP overlap",
    "lep_conversion": "instruct + LEP conversion",
    "lep_sum_conversion": "instruct + LEP sum_conversion",
    **{f"lep_{m}_calibrated": f"instruct + LEP {m} + self-calibration (LoRA)"
       for m in ("swap", "overlap", "conversion", "sum_conversion")},
}


def read_metrics(run_dir: Path) -> List[Dict]:
    path = run_dir / "pretrain" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_evals(run_dir: Path) -> Dict[str, Dict]:
    evals = {}
    for path in sorted((run_dir / "eval").glob("*/report.json")):
        evals[path.parent.name] = json.loads(path.read_text())
    order = list(MODEL_ROWS)
    return dict(sorted(evals.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def model_table(evals: Dict[str, Dict]) -> List[List[str]]:
    tasks = sorted({t for e in evals.values() for t in e.get("tasks", {})})
    head = ["model", "chars/token", "char perplexity", "bits/char"] + tasks
    rows = [head]
    for name, e in evals.items():
        p = e.get("perplexity", {})
        rows.append([name] + ([f"{p['chars_per_token']:.3f}", f"{p['char_perplexity']:.3f}", f"{p['bits_per_char']:.4f}"]
                              if p else ["-", "-", "-"])
                    + [f"{e['tasks'][t]['score']:.4f}" if t in e.get("tasks", {}) else "-" for t in tasks])
    return rows


def markdown_table(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def text_table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def plot_losses(metrics: List[Dict], out: Path) -> Optional[str]:
    if not metrics:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="train")
    valid = [m for m in metrics if "valid_loss" in m]
    if valid:
        ax.plot([m["step"] for m in valid], [m["valid_loss"] for m in valid], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("embedding-only continued pre-training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out.name


def plot_bars(values: Dict[str, float], title: str, ylabel: str, out: Path) -> Optional[str]:
    values = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
    if not values:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(values)), 3.5))
    ax.bar(range(len(values)), list(values.values()))
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(list(values), rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out.name


def plot_models(evals: Dict[str, Dict], out: Path) -> Optional[str]:
    """Per model: per-character perplexity (left) and every task's score (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(evals)
    tasks = sorted({t for e in evals.values() for t in e.get("tasks", {})})
    fig, axes = plt.subplots(1, 2 if tasks else 1, figsize=(11 if tasks else 6, 4), squeeze=False)
    ppl = [evals[n].get("perplexity", {}).get("char_perplexity", float("nan")) for n in names]
    axes[0][0].bar(range(len(names)), ppl)
    axes[0][0].set_title("per-character perplexity (lower is better)")
    for i, task in enumerate(tasks):
        width = 0.8 / len(tasks)
        scores = [evals[n].get("tasks", {}).get(task, {}).get("score", float("nan")) for n in names]
        axes[0][1].bar([x + i * width for x in range(len(names))], scores, width, label=task)
    if tasks:
        axes[0][1].set_title("task scores (higher is better)")
        axes[0][1].legend(fontsize=7)
    for ax in axes[0]:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out.name


def write_report(run_dir: Path) -> str:
    """Write report.md and the plots; returns the text table of the models."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    evals = read_evals(run_dir)
    tok_path = run_dir / "tokenizer_report.json"
    tokenizers = json.loads(tok_path.read_text()) if tok_path.is_file() else {}
    rows = model_table(evals)
    lines = ["# LEP pipeline report", ""]
    if tokenizers:
        lines += ["## Tokenizers on the held-out text", "", "| tokenizer | vocab | chars/token | tokens/word |",
                  "|---|---|---|---|"]
        lines += [f"| {Path(name).name} | {r['vocab_size']} | {r['chars_per_token']:.3f} | {r['tokens_per_word']:.3f} |"
                  for name, r in tokenizers.items()]
        chart = plot_bars({Path(n).name: r["chars_per_token"] for n, r in tokenizers.items()},
                          "characters per token (held-out text)", "chars/token", run_dir / "tokenizers.png")
        lines += ["", f"![chars per token]({chart})", ""]
    if metrics:
        valid = [m["valid_loss"] for m in metrics if "valid_loss" in m]
        lines += ["## Embedding-only continued pre-training", "",
                  f"{len(metrics)} steps: loss {metrics[0]['loss']:.4f} -> {metrics[-1]['loss']:.4f}"
                  + (f", validation loss {valid[0]:.4f} -> {valid[-1]:.4f}" if valid else ""), ""]
        chart = plot_losses(metrics, run_dir / "loss.png")
        lines += [f"![loss]({chart})", ""]
    if evals:
        lines += ["## Models", "", markdown_table(rows), "",
                  "char perplexity = exp(NLL of the held-out text / its characters): comparable across "
                  "tokenizers (lower is better).", ""]
        lines += [f"- **{name}**: {MODEL_ROWS.get(name, name)}" for name in evals]
        chart = plot_models(evals, run_dir / "scores.png")
        if chart:
            lines += ["", f"![scores]({chart})"]
    (run_dir / REPORT).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return text_table(rows) if evals else "(no evaluations)"
