"""`lep-megatron data`: documents stored as bos + the tokenizer's own ids + eos, a hash split,
the tokenizer's fingerprint and the blend weights recorded, and byte-identical output from one
process, two processes and two MPI ranks."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lep_megatron.common.io import UserInputError

pytestmark = pytest.mark.megatron

DATA_FILES = ("fortunes_train", "fortunes_valid", "manuals_train", "manuals_valid")


def documents(spec: dict):
    from lep_megatron.tokenizer.corpus import iter_documents

    return list(iter_documents([Path(f) for f in spec["files"]]))


def test_documents_are_bos_text_eos(built, corpora, new_tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from lep_megatron.data.build import is_valid_document
    from lep_megatron.tokenizer.token_map import tokenizer_fingerprint

    hf = AutoTokenizer.from_pretrained(str(new_tokenizer))
    meta = json.loads((built / "dataset.json").read_text())
    assert meta["tokenizer"]["fingerprint"] == tokenizer_fingerprint(new_tokenizer)
    assert (meta["tokenizer"]["vocab_size"], meta["tokenizer"]["bos_id"], meta["tokenizer"]["eos_id"]) == (2000, hf.bos_token_id, hf.eos_token_id)
    assert meta["blend"]["train"] == {"prefixes": ["fortunes_train", "manuals_train"], "weights": [3.0, 1.0]}
    assert meta["blend"]["valid"] == {"prefixes": ["fortunes_valid", "manuals_valid"], "weights": [3.0, 1.0]}
    for name, spec in corpora.items():
        docs = documents(spec)
        assert len(docs) == {"fortunes": 1500, "manuals": 500}[name]
        assert all(("\n" in d) == (name == "manuals") for d in docs)  # a JSONL record stays one document
        for split in ("train", "valid"):
            expected = [d for d in docs if is_valid_document(d, 0.05) == (split == "valid")]
            ds = IndexedDataset(str(built / f"{name}_{split}"))
            assert len(ds) == meta["corpora"][name][split]["documents"] == len(expected) > 0
            for i, doc in enumerate(expected):
                assert ds[i].tolist() == [hf.bos_token_id] + hf.encode(doc, add_special_tokens=False) + [hf.eos_token_id]
            assert meta["corpora"][name][split]["tokens"] == int(ds.sequence_lengths.sum())
    # about valid_fraction of the documents, none of them also in train
    n_valid = sum(meta["corpora"][n]["valid"]["documents"] for n in corpora)
    assert 0.03 < n_valid / 2000 < 0.07


def same_files(a: Path, b: Path):
    for name in DATA_FILES:
        for ext in (".bin", ".idx"):
            assert (a / (name + ext)).read_bytes() == (b / (name + ext)).read_bytes(), name + ext
    assert (a / "dataset.json").read_text() == (b / "dataset.json").read_text()


def test_three_processes_give_identical_bytes(built, corpora, new_tokenizer, tmp_path):
    from lep_megatron.data.build import DataConfig, build_dataset

    out = build_dataset(DataConfig(tokenizer=str(new_tokenizer), out_dir=str(tmp_path / "d"), corpora=corpora, valid_fraction=0.05, workers=3))
    same_files(built, out)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def mpiexec() -> str:
    pytest.importorskip("mpi4py")
    path = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's, beside the venv's python
    return str(path) if path.is_file() else shutil.which("mpiexec") or pytest.skip("no mpiexec")


def hydra_dict(corpora: dict) -> str:
    """corpora in hydra's override grammar: {name: {files: ['path'], weight: w}, ...}."""
    items = (f"{name}: {{files: [{', '.join(repr(f) for f in spec['files'])}], weight: {spec['weight']}}}" for name, spec in corpora.items())
    return "{" + ", ".join(items) + "}"


def test_mpiexec_two_ranks_give_identical_bytes(built, corpora, new_tokenizer, tmp_path):
    out = tmp_path / "d"
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "lep_megatron", "data", f"tokenizer={new_tokenizer}", f"out_dir={out}",
           f"corpora={hydra_dict(corpora)}", "valid_fraction=0.05"]
    # Open MPI refuses to start as root without these; SLURM_STEP_NUM_TASKS as srun -n 2 would
    # set it: a world that agrees with the step passes test_srun_step_without_an_mpi_world_is_refused's check
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", SLURM_STEP_NUM_TASKS="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shard 2/2" in proc.stderr and "shard 1/2" in proc.stderr
    same_files(built, out)


def test_mpi_world_smaller_than_the_srun_step_is_refused(new_tokenizer, tmp_path):
    """A real 1-rank MPI world (mpiexec -n 1) in a process that srun counts as one of 2 tasks:
    refused on every rank before anything is written, with the launch that fixes it."""
    (tmp_path / "x.txt").write_text("одна строка\nдругая строка\n", encoding="utf-8")
    cmd = [mpiexec(), "-n", "1", sys.executable, "-m", "lep_megatron", "data", f"tokenizer={new_tokenizer}",
           f"out_dir={tmp_path / 'd'}", f"corpus={tmp_path / 'x.txt'}", "launcher=mpi"]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_PROCID="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("error: task 1 of an srun step of 2 tasks (SLURM_STEP_NUM_TASKS=2) is in an MPI world of 1 rank: "
            "the tasks did not join one MPI job") in proc.stderr
    assert "Launch with srun --mpi=pmix or srun --mpi=pmi2" in proc.stderr and "mpirun/mpiexec -n 2" in proc.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("launcher", ["auto", "local"])
def test_srun_step_without_an_mpi_world_is_refused(launcher, new_tokenizer, corpora, tmp_path, monkeypatch):
    """srun -n 2 without a PMI the MPI library speaks (MpiDefault=none): no PMI variables, so
    each task would be a local build writing the same out_dir; every task refuses."""
    from lep_megatron.data.build import MPI_LAUNCH_VARS, DataConfig, build_dataset

    for var in MPI_LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    with pytest.raises(UserInputError) as err:
        build_dataset(DataConfig(tokenizer=str(new_tokenizer), out_dir=str(tmp_path / "d"), corpora=corpora,
                                 launcher=launcher, workers=1))
    if launcher == "auto":
        assert str(err.value).startswith("task 0 of an srun step of 2 tasks (SLURM_STEP_NUM_TASKS=2) is in an MPI "
                                         "world of 1 rank: the tasks did not join one MPI job")
        assert "Launch with srun --mpi=pmix or srun --mpi=pmi2" in str(err.value)
    else:
        assert str(err.value).startswith("launcher=local in task 0 of an srun step of 2 tasks")
        assert "srun -n 1" in str(err.value) and "srun --mpi=pmix or srun --mpi=pmi2 ... launcher=mpi" in str(err.value)
    assert not (tmp_path / "d").exists()


def test_slurm_worlds_that_are_accepted(built, corpora, new_tokenizer, tmp_path, monkeypatch):
    """The batch script of `sbatch -n 4` is one process (SLURM_NTASKS=4, no step): a local build;
    mpiexec inside an allocation runs one srun task (its proxy) per node and several ranks under
    each: a world larger than the step."""
    from lep_megatron.data.build import DataConfig, build_dataset, check_slurm_world

    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    out = build_dataset(DataConfig(tokenizer=str(new_tokenizer), out_dir=str(tmp_path / "d"), corpora=corpora,
                                   valid_fraction=0.05, workers=1, launcher="local"))
    same_files(built, out)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    check_slurm_world(4, "mpi")  # 2 nodes, mpiexec -n 4: no error
    check_slurm_world(2, "auto")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    check_slurm_world(1, "local")  # srun -n 1


@pytest.mark.slurm
@pytest.mark.slow
def test_srun_mpi_types_on_a_real_slurm(built, corpora, new_tokenizer, tmp_path):
    """srun -n 2 --mpi=pmi2: one MPI world of 2, the bytes of one process; --mpi=none (the
    cluster's MpiDefault): two 1-rank worlds, refused by each task. (tests/conftest.py skips it
    without the SLURM of tests/cluster/slurm_up.sh, fails it under CI=true.)"""
    data = [sys.executable, "-m", "lep_megatron", "data", f"tokenizer={new_tokenizer}",
            f"corpora={hydra_dict(corpora)}", "valid_fraction=0.05"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # timeouts: srun waits while other jobs hold the cluster's CPUs
    proc = subprocess.run(["srun", "-n", "2", "--mpi=pmi2", *data, f"out_dir={tmp_path / 'd'}"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shard 2/2" in proc.stderr and "shard 1/2" in proc.stderr
    same_files(built, tmp_path / "d")
    proc = subprocess.run(["srun", "-n", "2", "--mpi=none", *data, f"out_dir={tmp_path / 'e'}"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode != 0
    for task in (0, 1):
        assert f"error: task {task} of an srun step of 2 tasks (SLURM_STEP_NUM_TASKS=2) is in an MPI world of 1 rank" in proc.stderr
    assert not (tmp_path / "e").exists()


def test_rank0_error_reaches_every_rank(new_tokenizer, tmp_path):
    """An error found while merging on rank 0 ends rank 1 too (no hang), and leaves no out_dir."""
    (tmp_path / "x.txt").write_text("одна строка\nдругая строка\n", encoding="utf-8")
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "lep_megatron", "data", f"tokenizer={new_tokenizer}",
           f"out_dir={tmp_path / 'd'}", f"corpus={tmp_path / 'x.txt'}"]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    assert "error: corpora.corpus: no valid documents of 2; raise valid_fraction" in proc.stderr
    assert "error: rank 0 failed: corpora.corpus: no valid documents of 2" in proc.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(corpora={"a b": {"files": ["x.txt"]}}), "used in file names"),
        (dict(corpora={"a": {"files": ["missing.txt"]}}), "corpora.a.files: missing.txt does not exist"),
        (dict(corpora={"a": {"files": ["x.txt"], "weight": 0}}), "blend weights must be > 0"),
        (dict(valid_fraction=1.0), "valid_fraction=1.0 must lie in [0, 1)"),
        (dict(launcher="slurm"), "choose auto, mpi or local"),
    ],
)
def test_bad_config(change, message, new_tokenizer, tmp_path):
    from lep_megatron.data.build import DataConfig, build_dataset

    args = dict(tokenizer=str(new_tokenizer), out_dir=str(tmp_path / "d"), corpora={"a": {"files": ["x.txt"]}}, workers=1)
    with pytest.raises(UserInputError) as err:
        build_dataset(DataConfig(**dict(args, **change)))
    assert message in str(err.value)


def test_tokenizer_without_eos_is_refused(new_tokenizer, corpora, tmp_path):
    from lep_megatron.data.build import DataConfig, build_dataset

    tok = tmp_path / "tok"
    shutil.copytree(new_tokenizer, tok)
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="names no eos_token"):
        build_dataset(DataConfig(tokenizer=str(tok), out_dir=str(tmp_path / "d"), corpora=corpora, workers=1))


def test_too_few_documents_for_valid_split(new_tokenizer, tmp_path):
    from lep_megatron.data.build import DataConfig, build_dataset

    (tmp_path / "x.txt").write_text("одна строка\n", encoding="utf-8")
    with pytest.raises(UserInputError, match="no valid documents of 1; raise valid_fraction"):
        build_dataset(DataConfig(tokenizer=str(new_tokenizer), out_dir=str(tmp_path / "d"), corpora={"x": {"files": [str(tmp_path / "x.txt")]}}, workers=1))
    assert not (tmp_path / "d").exists()
