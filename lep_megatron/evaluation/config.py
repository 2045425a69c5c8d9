"""`lep-megatron eval` settings (conf/eval.yaml)."""
from dataclasses import dataclass, field
from typing import List, Optional

from lep_megatron.common.io import UserInputError


@dataclass
class EvalConfig:
    model: str
    """HF model directory (config, weights and tokenizer), or a lep-megatron Megatron checkpoint
    (lep_model.json; its tokenizer in hf/), scored with the Megatron backend at tp x pp."""
    data_dir: str
    """Folder holding the datasets as README.md lays them out (data_dir/<hub repo id>/...)."""
    out: str
    """Output folder: report.json, report.md, predictions/<task>.jsonl."""
    tasks: List[str] = field(default_factory=lambda: ["all"])
    """Task names, group names (DaruMMLU, DaruMERA, DaruSum, DaruCopy-EN, DaruCopy-RU) or all."""
    prompt_format: str = "base"
    """base (few-shot text), chat_template (the tokenizer's), or a conversation-config JSON path."""
    few_shot: Optional[int] = None
    """Few-shot examples per prompt; None: 5 with prompt_format=base, else 0 (the paper's setup)."""
    max_len: int = 4000
    """Token budget for few-shot assembly (the reference launchers' 4000)."""
    max_samples: Optional[int] = None
    """Cap on test items per task (None: full splits)."""
    batch_size: int = 8
    """Prompts per forward / generate call."""
    sample: bool = False
    """Sample at the reference's T=0.1, top-p 0.9, top-k 40 instead of greedy decoding."""
    seed: int = 0
    """Sampling seed."""
    dtype: str = "auto"
    """Model dtype: auto (from the checkpoint), float32, bfloat16, float16."""
    device: Optional[str] = None
    """HF models: cpu, cuda, cuda:1...; None: cuda when available (Megatron: the rank's GPU, else CPU)."""
    tp: int = 1
    """Megatron checkpoints: tensor parallel size (parallel.tp; run under torchrun with tp x pp ranks)."""
    pp: int = 1
    """Megatron checkpoints: pipeline parallel size (parallel.pp)."""
    copy_ratio_denominator: str = "generated"
    """Copy lcs ratio over the generated text (mid-2024) or the reference (later llmtf)."""
    mmlu_zero_shot_headline: bool = False
    """nlpcoreteam MMLU headline at 0-shot too (later llmtf)."""
    rouge_lemmatize: bool = True
    """Lemmatize before ROUGE (pymorphy3)."""
    rouge_measure: str = "f"
    """Abstractive score from ROUGE F (reference code) or recall (paper text)."""
    perplexity_text: Optional[str] = None
    """A UTF-8 text file (one document per line): also report the per-character perplexity of
    its first `perplexity_lines` lines (comparable across tokenizers)."""
    perplexity_lines: int = 1000
    """Documents of `perplexity_text` scored."""
    overwrite: bool = False
    """Replace an existing non-empty `out`."""

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserInputError(f"dtype={self.dtype}: choose auto, float32, bfloat16 or float16")
        for key in ("max_len", "batch_size", "tp", "pp"):
            if getattr(self, key) < 1:
                raise UserInputError(f"{key}={getattr(self, key)}: must be >= 1")
        if isinstance(self.tasks, str):
            self.tasks = [t for t in self.tasks.split(",") if t]
        if self.few_shot is None:
            self.few_shot = 5 if self.prompt_format == "base" else 0
