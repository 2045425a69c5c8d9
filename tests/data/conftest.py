"""Inputs of the data-stage tests: two small corpora (a text file and a JSONL file) cut from the
Russian demo corpus, a target-language tokenizer trained on them, and a dataset built once."""
import json
from pathlib import Path

import pytest

TEXT_LINES = 1500
JSONL_RECORDS = 500


@pytest.fixture(scope="session")
def corpora(corpus_dir, tmp_path_factory) -> dict:
    """{name: {files, weight}}: a text corpus (two files) and a JSONL corpus (one two-line record per document)."""
    lines = (corpus_dir / "train.txt").read_text(encoding="utf-8").splitlines()
    root = tmp_path_factory.mktemp("corpora")
    # two files, so that shard boundaries fall inside and between files
    (root / "fortunes_a.txt").write_text("\n".join(lines[:900]) + "\n", encoding="utf-8")
    (root / "fortunes_b.txt").write_text("\n".join(lines[900:TEXT_LINES]) + "\n", encoding="utf-8")
    with open(root / "manuals.jsonl", "w", encoding="utf-8") as f:
        tail = lines[-2 * JSONL_RECORDS:]
        for first, second in zip(tail[::2], tail[1::2]):  # a record is a document: its newline stays
            f.write(json.dumps({"id": len(first), "text": f"{first}\n{second}"}, ensure_ascii=False) + "\n")
    return {"fortunes": {"files": [str(root / "fortunes_a.txt"), str(root / "fortunes_b.txt")], "weight": 3.0}, "manuals": {"files": [str(root / "manuals.jsonl")], "weight": 1.0}}


@pytest.fixture(scope="session")
def new_tokenizer(corpora, tmp_path_factory) -> Path:
    from lep_megatron.tokenizer.train import TrainConfig, train

    files = [f for spec in corpora.values() for f in spec["files"]]
    return train(TrainConfig(corpus=files, out_dir=str(tmp_path_factory.mktemp("tok") / "bpe2k"), vocab_size=2000))


@pytest.fixture(scope="session")
def built(corpora, new_tokenizer, tmp_path_factory) -> Path:
    """The dataset built by one process."""
    from lep_megatron.data.build import DataConfig, build_dataset

    out = tmp_path_factory.mktemp("built") / "data"
    return build_dataset(DataConfig(tokenizer=str(new_tokenizer), out_dir=str(out), corpora=corpora, valid_fraction=0.05, workers=1))


@pytest.fixture(scope="session")
def originals_dir(tmp_path_factory):
    from lep_megatron.tokenizer import originals as O

    cache = tmp_path_factory.mktemp("originals")
    return lambda name: O.resolve(name, cache)
