"""End to end: `lep-megatron eval` on a tiny saved model, the copy tasks on the fixtures."""
import json
import subprocess
import sys

import pytest

from lep_megatron.common.io import UserInputError
from lep_megatron.evaluation import metrics
from lep_megatron.evaluation.app import run
from lep_megatron.evaluation.config import EvalConfig
from tests.evaluation.conftest import FIXTURES


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llama, tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_copy_tasks_end_to_end(model_dir, tmp_path, tokenizer):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "lep_megatron", "eval", f"model={model_dir}", f"data_dir={FIXTURES}",
           f"out={out}", "tasks=[darumeru/cp_sent_ru,darumeru/cp_sent_en]", "batch_size=2", "max_samples=2", "dtype=float32", "device=cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["tasks"]) == ["darumeru/cp_sent_en", "darumeru/cp_sent_ru"]
    assert report["settings"]["few_shot"] == 5
    # recompute each task's score from its predictions file
    for name, task in report["tasks"].items():
        rows = [json.loads(line) for line in (out / "predictions" / (name.replace("/", "__") + ".jsonl")).open()]
        assert len(rows) == task["requests"] == 2
        assert task["score"] == pytest.approx(metrics.mean(r["len"] for r in rows))  # sentences score `len`
        for r in rows:
            assert r["prompt"].startswith("<s>Скопируйте текст") and r["prompt"].endswith("Копия:")
            assert "\n" not in r["pred"]  # base format stops at the first newline
    assert report["groups"] == {"DaruCopy-EN": report["tasks"]["darumeru/cp_sent_en"]["score"],
                                "DaruCopy-RU": report["tasks"]["darumeru/cp_sent_ru"]["score"]}
    assert report["micro_average"] == pytest.approx(metrics.mean(t["score"] for t in report["tasks"].values()))
    assert "| DaruCopy-RU |" in (out / "report.md").read_text()


def test_missing_data_fails_before_writing_anything(model_dir, tmp_path):
    cfg = EvalConfig(model=str(model_dir), data_dir=str(tmp_path), out=str(tmp_path / "o"), tasks=["darumeru/RWSD"])
    with pytest.raises(UserInputError, match="task darumeru/RWSD: no 'test' split"):
        run(cfg)
    assert not (tmp_path / "o").exists()
