"""Fixtures shared by every test package."""
import os
from pathlib import Path

import pytest

from lep_megatron.common.io import UserInputError

CORPUS_DIR = Path(__file__).resolve().parents[1] / "data" / "corpus"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    if not (CORPUS_DIR / "heldout.txt").is_file():
        from lep_megatron.data.debian_corpus import build_corpus

        try:
            build_corpus(CORPUS_DIR)
        except UserInputError as err:
            if "apt-get download" in str(err):
                pytest.skip(f"Debian mirror unreachable, cannot build the Russian corpus: {err}")
            raise
    return CORPUS_DIR


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory, corpus_dir) -> dict:
    """A tiny Mistral (d 64, 2 layers, sharded safetensors) with the real Mistral tokenizer, and that
    tokenizer extended by 2,000 Russian pieces: {"base", "ext", "original"} directories."""
    from lep_megatron.models.tiny import make_hf_model
    from lep_megatron.tokenizer import originals
    from lep_megatron.tokenizer.extend import ExtendConfig, extend

    d = tmp_path_factory.mktemp("tiny_mistral")
    original = originals.resolve("mistral-7b", d / "cache")
    make_hf_model(d / "base", "mistral", vocab_size=32000, layers=2, tokenizer_dir=original, max_shard_size="2MB")
    extend(ExtendConfig(original=str(original), out_dir=str(d / "ext"), corpus=[str(corpus_dir / "train.txt")],
                        new_vocab_size=2000, max_sentences=20000, cache_dir=str(d / "cache")))
    return {"base": d / "base", "ext": d / "ext", "original": original}


def slurm_problem():
    """Why the SLURM of tests/cluster/slurm_up.sh cannot take jobs here (None: it can)."""
    import shutil
    import subprocess

    missing = [c for c in ("sinfo", "sbatch", "scontrol", "squeue") if shutil.which(c) is None]
    if missing:
        return f"{', '.join(missing)} not found"
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
    if proc.returncode != 0 or not states:
        return f"sinfo failed: {proc.stderr.strip()[-300:] or 'no nodes'}"
    usable = [n for n, s in states.items() if s.rstrip("*~#") in ("idle", "mix", "alloc", "comp")]
    if len(usable) < 2:
        return f"fewer than 2 usable nodes: {states}"
    return None


_SLURM = {}


def pytest_runtest_setup(item):
    """Tests marked `slurm` need the cluster of tests/cluster/slurm_up.sh: skipped without it,
    except under CI=true, where a missing SLURM fails them."""
    if item.get_closest_marker("slurm") is None:
        return
    if "problem" not in _SLURM:
        _SLURM["problem"] = slurm_problem()
    problem = _SLURM["problem"]
    if problem:
        message = f"no SLURM cluster ({problem}); start one with `sudo bash tests/cluster/slurm_up.sh`"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
