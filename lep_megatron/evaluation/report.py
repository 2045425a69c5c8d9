"""The Darumeru report: per-task scores, group means and the micro-average, as JSON + markdown."""
import json
from pathlib import Path
from typing import Any, Dict, List

from lep_megatron.evaluation.metrics import mean
from lep_megatron.evaluation.runner import TaskResult


def summarize(results: List[TaskResult], settings: Dict[str, Any]) -> Dict[str, Any]:
    groups: Dict[str, List[float]] = {}
    for r in results:
        groups.setdefault(r.group, []).append(r.score)
    return {
        "settings": settings,
        "tasks": {r.name: {"group": r.group, "score": r.score, "metrics": r.metrics, "requests": r.requests,
                           "seconds": round(r.seconds, 3)} for r in results},
        "groups": {g: mean(scores) for g, scores in groups.items()},
        # the paper's "micro-average": every task weighted equally
        "micro_average": mean(r.score for r in results),
    }


def markdown(summary: Dict[str, Any]) -> str:
    lines = ["# Darumeru", "", f"micro-average over {len(summary['tasks'])} tasks: "
             f"**{summary['micro_average']:.4f}**", "", "| group | score |", "|---|---|"]
    lines += [f"| {g} | {s:.4f} |" for g, s in summary["groups"].items()]
    lines += ["", "| task | group | score | metrics | requests |", "|---|---|---|---|---|"]
    for name, t in summary["tasks"].items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in t["metrics"].items())
        lines.append(f"| {name} | {t['group']} | {t['score']:.4f} | {shown} | {t['requests']} |")
    if "perplexity" in summary:
        p = summary["perplexity"]
        lines += ["", f"per-character perplexity of {p['documents']} held-out documents ({p['chars']} characters, "
                  f"{p['chars_per_token']:.3f} characters/token): **{p['char_perplexity']:.4f}** "
                  f"({p['bits_per_char']:.4f} bits/character)"]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, summary: Dict[str, Any]) -> None:
    out_dir = Path(out_dir)
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    (out_dir / "report.md").write_text(markdown(summary), encoding="utf-8")


def write_predictions(path: Path, requests, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for request, record in zip(requests, records):
            f.write(json.dumps({"prompt": request.prompt, **record}, ensure_ascii=False) + "\n")
