"""Darumeru inside training: a trainer StepHook that scores a few tasks with the model being
trained (the Megatron backend on the DDP-wrapped stage of every rank) every N steps.

The copy tasks are the default: they fail first when a vocabulary is broken, and they need no
answer keys beyond the text itself. `limit` caps the items per task so an evaluation costs
seconds, not the full benchmark (`lep-megatron eval` on a saved checkpoint does that)."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch.distributed as dist

from lep_megatron.checkpoint.megatron_io import HF_SUBDIR, CheckpointMeta
from lep_megatron.common.io import UserInputError
from lep_megatron.evaluation.backends.megatron import MegatronBackend
from lep_megatron.evaluation.prompts import make_format
from lep_megatron.evaluation.runner import evaluate, task_requests
from lep_megatron.evaluation.tasks import build, resolve
from lep_megatron.evaluation.tasks.base import TaskSettings


@dataclass
class TrainEvalConfig:
    """Train-time evaluation (the `eval.*` keys of conf/pretrain.yaml)."""

    every: int = 0
    """Score every N optimizer steps and after the last one; 0: off."""
    data_dir: Optional[str] = None
    """Darumeru data folder (laid out as for `lep-megatron eval`); required when every > 0."""
    tasks: List[str] = field(default_factory=lambda: ["DaruCopy-EN", "DaruCopy-RU"])
    """Task names or groups (as `lep-megatron eval tasks=`)."""
    limit: Optional[int] = 16
    """Test items per task (None: the whole split)."""
    few_shot: int = 5
    """Few-shot examples per prompt (base-model prompt format)."""
    max_len: int = 4000
    """Token budget of a few-shot prompt."""
    batch_size: int = 8
    """Prompts per forward."""

    def __post_init__(self):
        if self.every < 0:
            raise UserInputError(f"eval.every={self.every}: must be >= 0 (0: no train-time evaluation)")
        if self.every and not self.data_dir:
            raise UserInputError(f"eval.every={self.every} needs eval.data_dir (the Darumeru data folder; "
                                 "see lep_megatron/evaluation/README.md)")
        if self.data_dir and not Path(self.data_dir).is_dir():
            raise UserInputError(f"eval.data_dir={self.data_dir} is not a directory")
        if self.limit is not None and self.limit < 1:
            raise UserInputError(f"eval.limit={self.limit}: must be >= 1 or null")
        self.tasks = resolve(list(self.tasks))


class DarumeruHook:
    """Returns {"eval/<task>": leaderboard score} of the model at the step; runs on every rank."""

    def __init__(self, cfg: TrainEvalConfig, checkpoint: str):
        """`checkpoint`: the run's starting Megatron checkpoint (its vocabulary size, context and
        hf/ tokenizer are the trained model's)."""
        from transformers import AutoTokenizer

        self.cfg, self.every = cfg, cfg.every
        meta = CheckpointMeta.read(Path(checkpoint))
        self.vocab_size, self.max_positions = meta.vocab_size, meta.shape.max_position_embeddings
        self.tokenizer = AutoTokenizer.from_pretrained(str(Path(checkpoint) / HF_SUBDIR))
        self.settings = TaskSettings(few_shot=cfg.few_shot, max_samples=cfg.limit)
        self.format = make_format("base", self.tokenizer)
        # render every prompt once now: missing or malformed data stops the run before training
        text_only = MegatronBackend(None, self.tokenizer, self.vocab_size, self.max_positions)
        for name in cfg.tasks:
            task_requests(build(name, self.settings), text_only, self.format, Path(cfg.data_dir), cfg.max_len)

    def __call__(self, step: int, model) -> Dict[str, float]:
        backend = MegatronBackend(model, self.tokenizer, self.vocab_size, self.max_positions)
        scores = {}
        for result, _, _ in evaluate(backend, self.cfg.tasks, self.settings, self.format, Path(self.cfg.data_dir),
                                     self.cfg.max_len, self.cfg.batch_size):
            scores[f"eval/{result.name}"] = result.score
        if dist.get_rank() == 0:
            shown = " ".join(f"{k[5:]} {v:.4f}" for k, v in scores.items())
            print(f"step {step} darumeru: {shown}", flush=True)
        return scores
