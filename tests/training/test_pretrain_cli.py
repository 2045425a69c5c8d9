"""`lep-megatron pretrain` end to end on real data: the Russian demo corpus tokenized by the data
stage with a real tokenizer, a tiny model whose vocabulary is that tokenizer's; the loss falls and
the metrics are written (JSON lines and the same scalars as TensorBoard events). Data built with
another tokenizer is refused."""
import json
import subprocess
import sys

import pytest

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.data.build import DataConfig, build_dataset
from lep_megatron.models.tiny import make_hf_model
from lep_megatron.tokenizer.train import TrainConfig as TokenizerTrainConfig
from lep_megatron.tokenizer.train import train as train_tokenizer

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def setup(corpus_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("pretrain")
    lines = (corpus_dir / "train.txt").read_text(encoding="utf-8").splitlines()[:3000]
    (d / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = train_tokenizer(TokenizerTrainConfig(corpus=[str(d / "corpus.txt")], out_dir=str(d / "tok"), vocab_size=1000))
    make_hf_model(d / "hf", "llama", vocab_size=1000, layers=2, tokenizer_dir=tok)
    run(ConvertConfig("hf-to-mcore", d / "hf", d / "mc"))
    build_dataset(DataConfig(tokenizer=str(tok), out_dir=str(d / "data"), corpora={"ru": {"files": [str(d / "corpus.txt")]}},
                             valid_fraction=0.05, workers=1))
    return d


def pretrain(setup, out, *overrides):
    return subprocess.run(
        [sys.executable, "-m", "lep_megatron", "pretrain", f"checkpoint={setup / 'mc'}", f"out_dir={out}",
         f"data.dir={setup / 'data'}", "train.steps=8", "train.seq_length=64", "train.micro_batch_size=4",
         "train.global_batch_size=8", "train.warmup_steps=1", "train.lr=1e-2", *overrides],
        capture_output=True, text=True, timeout=600)


def test_loss_falls_on_the_demo_corpus(setup, tmp_path):
    data_files = sorted(p.relative_to(setup / "data") for p in (setup / "data").rglob("*"))
    proc = pretrain(setup, tmp_path / "run", "train.eval_every=4", "train.eval_batches=2",
                    f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # data.cache_dir: megatron's index cache (train and valid GPTDataset indexes) lands there, nothing in the data dir
    assert sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir()) == sorted(
        f"GPTDataset-{split}-{f}" for split in ("train", "valid")
        for f in ("description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy"))
    assert sorted(p.relative_to(setup / "data") for p in (setup / "data").rglob("*")) == data_files
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    losses = [r["loss"] for r in records]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.2, losses
    assert "step 8/8 loss" in proc.stdout
    # validation on the held-out documents at steps 4 and 8, falling too
    valid = {r["step"]: r["valid_loss"] for r in records if "valid_loss" in r}
    assert sorted(valid) == [4, 8] and valid[8] < valid[4], valid
    # TensorBoard holds the same scalars, read back with tensorboard's own reader (float32 values)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gib", "valid_loss"):
        logged = {r["step"]: r[key] for r in records if key in r}
        assert {e.step: e.value for e in events.Scalars(key)} == pytest.approx(logged, rel=1e-6), key
    assert set(events.Tags()["scalars"]) == {k for r in records for k, v in r.items() if k != "step" and v is not None}


def test_data_built_with_another_tokenizer_is_refused(setup, tmp_path, corpus_dir):
    other = train_tokenizer(TokenizerTrainConfig(corpus=[str(corpus_dir / "heldout.txt")], out_dir=str(tmp_path / "tok"),
                                                 vocab_size=800))
    build_dataset(DataConfig(tokenizer=str(other), out_dir=str(tmp_path / "data"),
                             corpora={"ru": {"files": [str(corpus_dir / "heldout.txt")]}}, workers=1))
    proc = pretrain(setup, tmp_path / "run", f"data.dir={tmp_path / 'data'}")
    assert proc.returncode == 2
    assert "dataset.json" in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_half_precision_without_distributed_optimizer_is_refused(setup, tmp_path):
    # megatron's Float16 optimizer would fail later: a TypeError about torch.cuda tensor types on
    # CPU, a checkpoint error on GPUs with megatron-core 0.19
    proc = pretrain(setup, tmp_path / "run", "train.dtype=bfloat16", "train.use_distributed_optimizer=false")
    assert proc.returncode == 2
    assert "train.use_distributed_optimizer=true" in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
