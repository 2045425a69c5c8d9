"""`lep-megatron eval model=... data_dir=... out=... [tasks=[...]]`: Darumeru on an HF model or a
Megatron checkpoint (under torchrun for tp x pp ranks: every rank scores, rank 0 writes)."""
import contextlib
import dataclasses
import sys
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from lep_megatron.checkpoint.megatron_io import META_NAME
from lep_megatron.common.app import stage_app
from lep_megatron.common.io import UserInputError, atomic_dir, check_out_dir
from lep_megatron.evaluation.backends.base import LMBackend
from lep_megatron.evaluation.config import EvalConfig
from lep_megatron.evaluation.perplexity import char_perplexity, read_lines
from lep_megatron.evaluation.prompts import make_format
from lep_megatron.evaluation.report import summarize, write_predictions, write_report
from lep_megatron.evaluation.runner import evaluate
from lep_megatron.evaluation.tasks import resolve
from lep_megatron.evaluation.tasks.base import TaskSettings


def load_backend(cfg: EvalConfig) -> LMBackend:
    """The Megatron backend for a lep-megatron checkpoint (lep_model.json), else transformers."""
    if (Path(cfg.model) / META_NAME).is_file():
        from lep_megatron.evaluation.backends.megatron import MegatronBackend

        if cfg.sample:
            raise UserInputError("sample=true: the Megatron backend decodes greedily; export the checkpoint "
                                 "(lep-megatron convert mcore-to-hf) to sample with transformers")
        return MegatronBackend.from_checkpoint(cfg.model, tp=cfg.tp, pp=cfg.pp, dtype=cfg.dtype)
    from lep_megatron.evaluation.backends.hf import HFBackend

    return HFBackend.from_pretrained(cfg.model, dtype=cfg.dtype, device=cfg.device, sample=cfg.sample, seed=cfg.seed)


def run(cfg: EvalConfig) -> dict:
    names = resolve(cfg.tasks)
    settings = TaskSettings(
        few_shot=cfg.few_shot, max_samples=cfg.max_samples, copy_ratio_denominator=cfg.copy_ratio_denominator,
        mmlu_zero_shot_headline=cfg.mmlu_zero_shot_headline, rouge_lemmatize=cfg.rouge_lemmatize,
        rouge_measure=cfg.rouge_measure,
    )
    check_out_dir(Path(cfg.out), cfg.overwrite, key="out")  # on every rank, before loading a model
    texts = read_lines(Path(cfg.perplexity_text), cfg.perplexity_lines) if cfg.perplexity_text else None
    backend = load_backend(cfg)
    fmt = make_format(cfg.prompt_format, backend.tokenizer)
    writer = not dist.is_initialized() or dist.get_rank() == 0  # all ranks score, one writes
    results = []
    with atomic_dir(Path(cfg.out), overwrite=cfg.overwrite, key="out") if writer else contextlib.nullcontext() as tmp:
        for result, requests, records in evaluate(backend, names, settings, fmt, Path(cfg.data_dir),
                                                  cfg.max_len, cfg.batch_size):
            results.append(result)
            if writer:
                print(f"{result.name}: {result.score:.4f} {result.metrics}", file=sys.stderr, flush=True)
                write_predictions(tmp / "predictions" / (result.name.replace("/", "__") + ".jsonl"), requests, records)
        summary = summarize(results, dataclasses.asdict(cfg))
        if texts is not None:
            summary["perplexity"] = char_perplexity(backend, texts, cfg.batch_size)
        if writer:
            write_report(tmp, summary)
    return summary


@stage_app("eval")
def main(conf: DictConfig) -> None:
    settings = OmegaConf.to_container(conf, resolve=True)
    parallel = settings.pop("parallel")
    summary = run(EvalConfig(tp=parallel["tp"], pp=parallel["pp"], **settings))
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"micro-average {summary['micro_average']:.4f} -> {conf.out}/report.md")
