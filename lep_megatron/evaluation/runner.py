"""Run tasks on a backend: render prompts, call the backend in batches, score, aggregate.

`evaluate` needs only an `LMBackend`, so the trainer can call it in-process on its own model."""
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from lep_megatron.common.io import progress
from lep_megatron.evaluation.backends.base import LMBackend
from lep_megatron.evaluation.prompts import PromptBuilder, PromptFormat
from lep_megatron.evaluation.tasks import build
from lep_megatron.evaluation.tasks.base import CHOICE, GENERATE, LOGLIK, Request, Task, TaskSettings


@dataclass
class TaskResult:
    name: str
    group: str
    score: float
    """The task's leaderboard value."""
    metrics: Dict[str, float]
    requests: int
    seconds: float


def effective_max_len(max_len: int, max_positions: int, max_new_tokens: int) -> int:
    """llmtf's MaxLenContext: leave room for the generated tokens within the model's context."""
    return max_positions - max_new_tokens if max_positions < max_len + max_new_tokens else max_len


def call_backend(task: Task, backend: LMBackend, requests: Sequence[Request], batch_size: int,
                 stop_strings: Sequence[str]) -> List[Any]:
    # longest first, so batches hold similar lengths (less padding) and memory peaks early
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    outputs: List[Any] = [None] * len(requests)
    for batch in progress(batches, len(batches), f"{task.name} batches"):
        prompts = [requests[i].prompt for i in batch]
        if task.method == CHOICE:
            results = backend.choice_probs(prompts, task.choices)
        elif task.method == LOGLIK:
            results = backend.span_logprobs(prompts, [requests[i].span_start for i in batch])
        elif task.method == GENERATE:
            results = backend.generate(prompts, task.max_new_tokens, stop_strings)
        else:
            raise ValueError(f"task {task.name}: unknown method {task.method}")
        for i, result in zip(batch, results):
            outputs[i] = result
    return outputs


def task_requests(task: Task, backend: LMBackend, fmt: PromptFormat, data_dir: Path, max_len: int) -> List[Request]:
    """Read the task's data and render its prompts for `backend`'s tokenizer (no model call)."""
    builder = PromptBuilder(
        format=fmt, count_tokens=backend.count_tokens, bos_text=backend.bos_text,
        max_len=effective_max_len(max_len, backend.max_positions, task.max_new_tokens),
        leading_space=backend.adds_leading_space,
    )
    return task.requests(Path(data_dir), builder)


def run_task(task: Task, backend: LMBackend, fmt: PromptFormat, data_dir: Path, max_len: int,
             batch_size: int) -> Tuple[TaskResult, List[Request], List[Dict[str, Any]]]:
    start = time.monotonic()
    requests = task_requests(task, backend, fmt, data_dir, max_len)
    outputs = call_backend(task, backend, requests, batch_size, fmt.stop_strings)
    records = [task.score(r.doc, out) for r, out in zip(requests, outputs)]
    task_metrics = task.aggregate(records)
    result = TaskResult(task.name, task.group, task.leaderboard(task_metrics), task_metrics, len(requests),
                        time.monotonic() - start)
    return result, requests, records


def evaluate(backend: LMBackend, task_names: Sequence[str], settings: TaskSettings, fmt: PromptFormat,
             data_dir: Path, max_len: int = 4000, batch_size: int = 8):
    """Yield (TaskResult, requests, records) per task, in order."""
    for name in task_names:
        yield run_task(build(name, settings), backend, fmt, data_dir, max_len, batch_size)
