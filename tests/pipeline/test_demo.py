"""The demo pipeline at its smallest setting, end to end on CPU: killed during a training step
and restarted, it finishes without redoing earlier steps and writes a report whose figures are
finite, with the adapted tokenizer compressing Russian better than the original."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.megatron, pytest.mark.slow, pytest.mark.primary_only]

TINY = [
    "model.hidden=32", "model.ffn=64", "model.layers=2", "corpus.max_mb_per_source=0.1",
    "base_train.steps=40", "base_train.warmup_steps=2", "+base_train.save_every=4", "base_train.seq_length=64",
    "instruct_train.steps=4", "instruct_train.warmup_steps=1", "instruct_train.seq_length=64", "instruct_examples=100",
    "eval_items=3", "lep.tokenizer.new_vocab_size=1500", "lep.tokenizer.max_sentences=5000",
    "lep.pretrain.train.steps=6", "lep.pretrain.train.warmup_steps=1", "lep.pretrain.train.seq_length=64",
    "lep.pretrain.train.eval_every=3", "lep.pretrain.train.eval_batches=1", "lep.eval.perplexity_lines=10",
    "calibration_prompts=16", "lep.calibration.max_new_tokens=8", "lep.calibration.keep_unfinished=true", "lep.calibration.max_length=64",
    "lep.calibration.train.epochs=1", "lep.calibration.train.seq_length=64", "lep.calibration.train.warmup_steps=1",
]
MODELS = ("base", "instruct", "adapted_base", "lep_swap", "lep_overlap", "lep_conversion", "lep_conversion_calibrated")


def demo(run_dir: Path):
    return [sys.executable, "-m", "lep_megatron", "demo", f"run_dir={run_dir}"] + TINY


def test_demo_resumes_after_a_kill_and_reports(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    first = subprocess.Popen(demo(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    pointer = run_dir / "base_pretrain" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not pointer.is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, f"the demo ended before its first checkpoint (exit code {first.returncode})"
    os.killpg(first.pid, signal.SIGKILL)  # mid-training: a checkpoint exists, the step is unfinished
    first.wait()
    assert pointer.is_file() and not (run_dir / "state" / "base_pretrain.json").exists()
    killed_at = int(pointer.read_text().strip().split("_")[1])
    assert killed_at < 40

    second = subprocess.run(demo(run_dir), env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    out = second.stdout
    for step in ("corpus_ru", "corpus_en", "base_model", "base_convert", "base_data"):
        assert f"{step}: done earlier, skipped" in out
    assert "base_pretrain: resuming" in out and f"(step {killed_at})" in out
    losses = [json.loads(line)["step"] for line in (run_dir / "base_pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] == 40

    tokenizers = json.loads((run_dir / "tokenizer_report.json").read_text())
    assert tokenizers["tokenizer"]["chars_per_token"] > tokenizers["base"]["chars_per_token"]
    for name in MODELS:
        report = json.loads((run_dir / "eval" / name / "report.json").read_text())
        ppl = report["perplexity"]
        assert math.isfinite(ppl["char_perplexity"]) and ppl["char_perplexity"] > 1, name
        assert ppl["chars"] == json.loads((run_dir / "eval" / "base" / "report.json").read_text())["perplexity"]["chars"]
        assert 0 <= report["tasks"]["darumeru/cp_sent_ru"]["score"] <= 1
    # the LEP models read Russian with the adapted tokenizer, the original instruct with the old one
    ppl = {n: json.loads((run_dir / "eval" / n / "report.json").read_text())["perplexity"] for n in MODELS}
    assert ppl["lep_conversion"]["chars_per_token"] == ppl["adapted_base"]["chars_per_token"] > ppl["instruct"]["chars_per_token"]
    metrics = [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics) and "valid_loss" in metrics[-1]
    report = (run_dir / "report.md").read_text()
    assert all(f"| {name} |" in report for name in MODELS)
    for png in ("loss.png", "tokenizers.png", "scores.png"):
        assert (run_dir / png).stat().st_size > 1000
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["packages"]["megatron-core"] and set(manifest["steps"]) >= {"base_pretrain", "eval_lep_conversion"}
