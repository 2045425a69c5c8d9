"""What a Darumeru task is: data -> prompts -> one backend call each -> per-item records -> metrics."""
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from lep_megatron.common.io import UserInputError
from lep_megatron.evaluation.metrics import mean
from lep_megatron.evaluation.prompts import Message, PromptBuilder

CHOICE, LOGLIK, GENERATE = "choice", "loglik", "generate"


@dataclass
class TaskSettings:
    """Run-wide settings that tasks read."""

    few_shot: int = 5
    """Few-shot examples per prompt (added while the prompt fits max_len); 0 for instruct models."""
    max_samples: Optional[int] = None
    """Cap on test items per task (None: the full split; the summarization tasks cap at 500)."""
    copy_ratio_denominator: str = "generated"
    """Copy `lcs`: matched chars over the generated text (mid-2024) or `reference` (later)."""
    mmlu_zero_shot_headline: bool = False
    """nlpcoreteam MMLU: add the subject headline also at 0-shot (the reference's later behaviour)."""
    rouge_lemmatize: bool = True
    """Lemmatize words (pymorphy3) before ROUGE, as the reference does (with pymorphy2)."""
    rouge_measure: str = "f"
    """ROUGE value the abstractive score averages: `f` (reference code) or `recall` (paper text)."""

    def __post_init__(self):
        if self.few_shot < 0:
            raise UserInputError(f"few_shot={self.few_shot}: must be >= 0")
        if self.copy_ratio_denominator not in ("generated", "reference"):
            raise UserInputError(f"copy_ratio_denominator={self.copy_ratio_denominator}: generated or reference")
        if self.rouge_measure not in ("f", "recall"):
            raise UserInputError(f"rouge_measure={self.rouge_measure}: f or recall")


@dataclass
class Request:
    """One backend call."""

    prompt: str
    doc: Dict[str, Any]
    """What scoring needs (gold answers, ids); saved with the prediction."""
    span_start: int = 0
    """LOGLIK only: the first character of the scored span of `prompt`."""


class Task(ABC):
    name: str
    """Registry name, as llmtf names the task."""
    group: str
    """Darumeru group of the report's group table."""
    method: str
    """CHOICE (next-token probability of each choice), LOGLIK (span log-probs) or GENERATE."""
    choices: Sequence[str] = ()
    max_new_tokens: int = 0

    def __init__(self, settings: TaskSettings):
        self.settings = settings

    @abstractmethod
    def requests(self, data_dir: Path, builder: PromptBuilder) -> List[Request]:
        """Read the task's local data and render every prompt."""

    @abstractmethod
    def score(self, doc: Dict[str, Any], output: Any) -> Dict[str, Any]:
        """Per-request record from the backend output (choice probs, log-probs or a Generation)."""

    @abstractmethod
    def aggregate(self, records: List[Dict[str, Any]]) -> Dict[str, float]:
        """Task metrics from all records."""

    def leaderboard(self, metrics: Dict[str, float]) -> float:
        """The task's single score: by default the mean of its metrics."""
        return mean(metrics.values())

    def cap(self, items: List, limit: Optional[int] = None) -> List:
        caps = [c for c in (self.settings.max_samples, limit) if c is not None]
        return items[:min(caps)] if caps else items


def argmax_choice(choices: Sequence[str], probs: Sequence[float]) -> str:
    """The most probable choice; ties go to the earlier one."""
    best = max(range(len(choices)), key=lambda i: (probs[i], -i))
    return choices[best]


def fill_messages(record: Dict[str, Any]) -> List[Message]:
    """Darumeru record: message templates filled from `inputs`."""
    return [{"role": m["role"], "content": m["content"].format(**record["inputs"])} for m in record["messages"]]
