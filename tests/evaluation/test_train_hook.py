"""Train-time Darumeru: a short CPU pretrain run with `eval.every` scores a fixture copy task with
the model being trained; the scores in metrics.jsonl equal the standalone Megatron backend's on
the checkpoints saved at the same steps."""
import json
import subprocess
import sys

import pytest

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.common.io import UserInputError
from lep_megatron.evaluation.backends.megatron import MegatronBackend
from lep_megatron.evaluation.prompts import BASE_FORMAT
from lep_megatron.evaluation.runner import evaluate
from lep_megatron.evaluation.tasks.base import TaskSettings
from lep_megatron.evaluation.train_hook import DarumeruHook, TrainEvalConfig
from lep_megatron.models.tiny import make_hf_model
from tests.evaluation.conftest import FIXTURES

pytestmark = pytest.mark.megatron
TASK = "darumeru/cp_sent_ru"


def lep_megatron(*args):
    proc = subprocess.run([sys.executable, "-m", "lep_megatron", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    """A Megatron checkpoint of a tiny Llama over the fixtures' BPE tokenizer (in its hf/)."""
    d = tmp_path_factory.mktemp("train_hook")
    tokenizer.save_pretrained(d / "tok")
    make_hf_model(d / "hf", "llama", vocab_size=len(tokenizer), layers=2, tokenizer_dir=d / "tok")
    run(ConvertConfig("hf-to-mcore", d / "hf", d / "mc"))
    return d / "mc"


@pytest.mark.slow
def test_train_time_scores_equal_scoring_the_saved_checkpoints(checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    proc = lep_megatron("pretrain", f"checkpoint={checkpoint}", f"out_dir={run_dir}", "data.kind=synthetic",
                        "train.steps=4", "train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=2",
                        "train.warmup_steps=1", "train.lr=5e-2", "train.save_every=2",
                        "eval.every=2", f"eval.data_dir={FIXTURES}", f"eval.tasks=[{TASK}]", "eval.limit=2")
    assert f"step 2 darumeru: {TASK}" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r[f"eval/{TASK}"] for r in records if f"eval/{TASK}" in r}
    assert sorted(logged) == [2, 4] and [r["step"] for r in records] == [1, 2, 3, 4]
    for step, score in logged.items():
        backend = MegatronBackend.from_checkpoint(str(run_dir / "checkpoints" / f"step_{step:07d}"))
        [(result, _, _)] = evaluate(backend, [TASK], TaskSettings(few_shot=5, max_samples=2), BASE_FORMAT, FIXTURES)
        assert result.score == pytest.approx(score, abs=1e-12), step
    assert logged[2] != logged[4]  # the scores follow the training


def test_missing_data_stops_before_training(checkpoint, tmp_path):
    cfg = TrainEvalConfig(every=10, data_dir=str(tmp_path), tasks=[TASK])
    with pytest.raises(UserInputError, match=f"task {TASK}: no 'test' split"):
        DarumeruHook(cfg, str(checkpoint))


def test_settings_are_checked():
    with pytest.raises(UserInputError, match="eval.every=2 needs eval.data_dir"):
        TrainEvalConfig(every=2)
    with pytest.raises(UserInputError, match="unknown task or group 'DaruCopy'"):
        TrainEvalConfig(tasks=["DaruCopy"])
    assert sorted(TrainEvalConfig().tasks) == [f"darumeru/cp_{kind}_{lang}" for kind in ("para", "sent")
                                               for lang in ("en", "ru")]
