"""`lep-megatron eval model=... data_dir=... out=... [tasks=[...]]`: Darumeru on an HF model."""
import dataclasses
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lep_megatron.common.app import stage_app
from lep_megatron.common.io import atomic_dir
from lep_megatron.evaluation.backends.hf import HFBackend
from lep_megatron.evaluation.config import EvalConfig
from lep_megatron.evaluation.prompts import make_format
from lep_megatron.evaluation.report import summarize, write_predictions, write_report
from lep_megatron.evaluation.runner import evaluate
from lep_megatron.evaluation.tasks import resolve
from lep_megatron.evaluation.tasks.base import TaskSettings


def run(cfg: EvalConfig) -> dict:
    names = resolve(cfg.tasks)
    settings = TaskSettings(
        few_shot=cfg.few_shot, max_samples=cfg.max_samples, copy_ratio_denominator=cfg.copy_ratio_denominator,
        mmlu_zero_shot_headline=cfg.mmlu_zero_shot_headline, rouge_lemmatize=cfg.rouge_lemmatize,
        rouge_measure=cfg.rouge_measure,
    )
    backend = HFBackend.from_pretrained(cfg.model, dtype=cfg.dtype, device=cfg.device, sample=cfg.sample, seed=cfg.seed)
    fmt = make_format(cfg.prompt_format, backend.tokenizer)
    results = []
    with atomic_dir(Path(cfg.out), overwrite=cfg.overwrite, key="out") as tmp:
        for result, requests, records in evaluate(backend, names, settings, fmt, Path(cfg.data_dir),
                                                  cfg.max_len, cfg.batch_size):
            print(f"{result.name}: {result.score:.4f} {result.metrics}", file=sys.stderr, flush=True)
            write_predictions(tmp / "predictions" / (result.name.replace("/", "__") + ".jsonl"), requests, records)
            results.append(result)
        summary = summarize(results, dataclasses.asdict(cfg))
        write_report(tmp, summary)
    return summary


@stage_app("eval")
def main(conf: DictConfig) -> None:
    summary = run(EvalConfig(**OmegaConf.to_container(conf, resolve=True)))
    print(f"micro-average {summary['micro_average']:.4f} -> {conf.out}/report.md")
