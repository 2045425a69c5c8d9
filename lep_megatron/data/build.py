"""Text/JSONL corpora -> Megatron indexed datasets (.bin/.idx), tokenized with the new tokenizer.

Every line of a text file and every JSONL record (its text field whole, newlines kept) is one
document, stored as bos + tokens + eos. A document goes to the valid split when a
hash of its text falls under valid_fraction, so the split does not depend on order or sharding.

The documents of each corpus are cut into contiguous shards, one per process: processes of
this node (multiprocessing) and, under an MPI launch (mpi4py), those of every rank. Each shard
writes partial indexes; rank 0 concatenates them in shard order with
IndexedDatasetBuilder.add_index, so the output is byte-identical for any number of processes.
Across nodes, out_dir must lie on a filesystem that every rank sees. Tasks of an srun step that do
not form one MPI world (no PMI: every task would build the whole dataset) are refused.

out_dir/dataset.json records the tokenizer's fingerprint (the trainer refuses data built with
another tokenizer), the blend weights and the counts; out_dir/<corpus>_<split>.bin/.idx hold
the tokens.
"""
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path
from tokenizers import Tokenizer

from lep_megatron.common.io import UserInputError, atomic_dir, progress
from lep_megatron.tokenizer import vocab as V
from lep_megatron.tokenizer.corpus import corpus_files, iter_documents
from lep_megatron.tokenizer.originals import family_tokens
from lep_megatron.tokenizer.token_map import tokenizer_fingerprint

FORMAT_VERSION = "1"
META_FILE = "dataset.json"
SPLITS = ("train", "valid")
# environment variables an MPI launcher (mpiexec of MPICH/Open MPI, srun --mpi) sets in every rank
MPI_LAUNCH_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
# tasks of the srun job step this process is one of; srun sets it in every task, the batch script
# of sbatch has none (its SLURM_NTASKS is the allocation's, while it runs as one process)
SLURM_STEP_TASKS = "SLURM_STEP_NUM_TASKS"


@dataclass
class CorpusSpec:
    """One corpus of the blend."""

    files: List[str]
    """Text/JSONL files or globs (a list, or one comma-separated string)."""
    weight: float = 1.0
    """Blend weight: the share of training samples drawn from this corpus (normalized over corpora)."""

    def __post_init__(self):
        if isinstance(self.files, str):
            self.files = [s for s in self.files.split(",") if s.strip()]
        self.files = [str(f) for f in self.files]
        if not self.weight > 0:
            raise UserInputError(f"weight={self.weight}: blend weights must be > 0")


def _corpus_spec(name: str, spec) -> CorpusSpec:
    if not isinstance(spec, dict) or "files" not in spec or set(spec) - {"files", "weight"}:
        raise UserInputError(f"corpora.{name}={spec!r}: expected {{files: [...], weight: w}}")
    return CorpusSpec(**spec)


@dataclass
class DataConfig:
    """How to turn corpora into Megatron indexed datasets."""

    tokenizer: str
    """HF tokenizer dir (the new tokenizer); its tokenizer_config.json must name an eos_token."""
    out_dir: str
    """Output dir (written atomically): dataset.json and <corpus>_<split>.bin/.idx."""
    corpora: Dict[str, CorpusSpec]
    """Corpus name (used in file names) -> files and blend weight."""
    text_field: str = "text"
    """Field holding the text in JSONL files."""
    valid_fraction: float = 0.01
    """Share of documents (chosen by a hash of their text) held out for validation; 0: none."""
    workers: Optional[int] = None
    """Tokenizing processes per launch rank; None: all CPU cores without MPI, 1 per MPI rank."""
    launcher: str = "auto"
    """`auto` (MPI when launched by mpiexec/srun with mpi4py installed), `mpi` or `local`."""
    batch_size: int = 512
    """Documents per tokenizer call."""
    overwrite: bool = False
    """Replace an existing non-empty out_dir."""

    def __post_init__(self):
        self.corpora = {str(k): v if isinstance(v, CorpusSpec) else _corpus_spec(k, v) for k, v in dict(self.corpora).items()}
        if not self.corpora:
            raise UserInputError("no corpus given; pass corpus=FILES_OR_GLOBS or corpora={name: {files: ..., weight: ...}}")
        for name in self.corpora:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise UserInputError(f"corpora: name {name!r} is used in file names; use letters, digits, _ . -")
        if not 0 <= self.valid_fraction < 1:
            raise UserInputError(f"valid_fraction={self.valid_fraction} must lie in [0, 1)")
        if self.workers is not None and self.workers < 1:
            raise UserInputError(f"workers={self.workers} must be >= 1 (or null for all cores)")
        if self.launcher not in ("auto", "mpi", "local"):
            raise UserInputError(f"launcher={self.launcher!r}: choose auto, mpi or local")
        if self.batch_size < 1:
            raise UserInputError(f"batch_size={self.batch_size} must be >= 1")


@dataclass
class ShardJob:
    """What one process tokenizes: documents [start, stop) of each corpus."""

    index: int
    """Shard number; partial indexes are merged in this order."""
    count: int
    """Number of shards."""
    tokenizer_dir: str
    """HF tokenizer dir."""
    files: Dict[str, List[Tuple[str, int]]]
    """Corpus name -> its files and their document counts."""
    ranges: Dict[str, Tuple[int, int]]
    """Corpus name -> [start, stop) document numbers of this shard."""
    parts_dir: str
    """Where the partial indexes go."""
    text_field: str
    """JSONL text field."""
    valid_fraction: float
    """See DataConfig.valid_fraction."""
    batch_size: int
    """Documents per tokenizer call."""
    dtype: str
    """numpy dtype name of the token ids."""
    bos_id: Optional[int]
    """Prepended to every document (None: the tokenizer has no bos)."""
    eos_id: int
    """Appended to every document."""


def is_valid_document(text: str, valid_fraction: float) -> bool:
    """Whether a document belongs to the valid split: a 64-bit hash of its text below the fraction."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < valid_fraction * 2**64


def part_prefix(parts_dir: str, corpus: str, split: str, shard: int) -> str:
    return os.path.join(parts_dir, f"{corpus}_{split}.{shard:05d}")


def shard_documents(files: List[Tuple[str, int]], start: int, stop: int, text_field: str) -> Iterator[str]:
    """Documents [start, stop) of a corpus, opening only the files that hold them."""
    offset = 0
    for path, n in files:
        if offset < stop and start < offset + n:
            with closing(iter_documents([Path(path)], text_field)) as lines:
                yield from itertools.islice(lines, max(start - offset, 0), min(stop, offset + n) - offset)
        offset += n


def count_documents(comm, rank: int, size: int, paths: List[str], text_field: str) -> Dict[str, int]:
    """Documents per file; under MPI each rank counts every size-th file. A bad file fails every rank."""
    mine, error = {}, None
    try:
        for path in paths[rank::size]:
            mine[path] = sum(1 for _ in iter_documents([Path(path)], text_field))
    except UserInputError as err:
        error = str(err)
    results = comm.allgather((mine, error)) if comm is not None else [(mine, error)]
    errors = [e for _, e in results if e]
    if errors:
        raise UserInputError(errors[0])
    return {path: n for counts, _ in results for path, n in counts.items()}


def tokenize_shard(job: ShardJob) -> Dict[str, Dict[str, Dict[str, int]]]:
    """Write this shard's partial indexes; return {corpus: {split: {documents, tokens}}}."""
    tok = Tokenizer.from_file(os.path.join(job.tokenizer_dir, "tokenizer.json"))
    head = [] if job.bos_id is None else [job.bos_id]
    dtype = numpy.dtype(job.dtype).type
    stats = {}
    for name, files in job.files.items():
        start, stop = job.ranges[name]
        builders = {s: IndexedDatasetBuilder(get_bin_path(part_prefix(job.parts_dir, name, s, job.index)), dtype) for s in SPLITS}
        counts = {s: {"documents": 0, "tokens": 0} for s in SPLITS}
        docs = progress(shard_documents(files, start, stop, job.text_field), stop - start, f"data: {name} shard {job.index + 1}/{job.count}")
        while batch := list(itertools.islice(docs, job.batch_size)):
            for text, enc in zip(batch, tok.encode_batch(batch, add_special_tokens=False)):
                ids = head + enc.ids + [job.eos_id]
                split = "valid" if is_valid_document(text, job.valid_fraction) else "train"
                builders[split].add_document(ids, [len(ids)])
                counts[split]["documents"] += 1
                counts[split]["tokens"] += len(ids)
        for split, builder in builders.items():
            builder.finalize(get_idx_path(part_prefix(job.parts_dir, name, split, job.index)))
        stats[name] = counts
    return stats


def mpi_comm(launcher: str):
    """COMM_WORLD when this process is an MPI rank (or launcher=mpi), else None."""
    if launcher == "local" or (launcher == "auto" and not any(v in os.environ for v in MPI_LAUNCH_VARS)):
        return None
    try:
        from mpi4py import MPI
    except ImportError as err:
        if launcher == "mpi":
            raise UserInputError(f"launcher=mpi needs mpi4py and an MPI library: pip install mpich mpi4py ({err})") from err
        return None
    return MPI.COMM_WORLD


def check_slurm_world(size: int, launcher: str) -> None:
    """Refuse an srun step whose tasks did not join one MPI world of them all.

    Under `srun -n N` without a PMI the MPI library knows (slurm.conf's MpiDefault=none, or an
    --mpi type the library does not speak), every task starts as its own 1-rank world (or, seeing no
    launcher, as a local build) and all N build the whole dataset into the same out_dir. A world
    larger than the step is fine: mpirun/mpiexec inside an allocation starts one srun task per node
    (its proxy) and several ranks under each."""
    tasks = os.environ.get(SLURM_STEP_TASKS, "")
    if not tasks.isdigit() or int(tasks) <= 1 or size >= int(tasks):
        return
    task = os.environ.get("SLURM_PROCID", "?")
    if launcher == "local":
        raise UserInputError(
            f"launcher=local in task {task} of an srun step of {tasks} tasks ({SLURM_STEP_TASKS}={tasks}): every task "
            f"would build the whole dataset into out_dir; run one task (srun -n 1; workers= sets its processes) "
            f"or an MPI build: srun --mpi=pmix or srun --mpi=pmi2 ... launcher=mpi, or mpirun/mpiexec -n {tasks}")
    raise UserInputError(
        f"task {task} of an srun step of {tasks} tasks ({SLURM_STEP_TASKS}={tasks}) is in an MPI world of {size} "
        f"rank{'s' if size != 1 else ''}: the tasks did not join one MPI job (srun gave them no PMI the MPI library "
        f"speaks; with launcher=auto, mpi4py must be installed too: pip install mpich mpi4py), and each would build "
        f"the whole dataset into the same out_dir. Launch with srun --mpi=pmix or srun --mpi=pmi2 (`srun --mpi=list` "
        f"shows what this SLURM offers), or with mpirun/mpiexec -n {tasks} inside the allocation instead of srun")


def tokenizer_info(tokenizer_dir: Path) -> Dict:
    """What dataset.json records about the tokenizer: fingerprint, vocabulary size, bos/eos ids."""
    V.load_tokenizer_json(tokenizer_dir, "tokenizer")
    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    bos, eos = family_tokens(tokenizer_dir)
    if eos is None or tok.token_to_id(eos) is None:
        raise UserInputError(
            f"tokenizer={tokenizer_dir}: tokenizer_config.json names no eos_token in the vocabulary; "
            "documents need one to be separated (build the tokenizer with `lep-megatron tokenizer`)"
        )
    return {
        "fingerprint": tokenizer_fingerprint(tokenizer_dir),
        "path": str(Path(tokenizer_dir).absolute()),
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "bos_id": None if bos is None else tok.token_to_id(bos),
        "eos_id": tok.token_to_id(eos),
    }


def _run_shards(jobs: List[ShardJob]) -> List[Dict]:
    if len(jobs) == 1:
        return [tokenize_shard(jobs[0])]
    # fork: workers inherit the imported torch/megatron (seconds per spawned process); the
    # parent has not run the tokenizer's thread pool (were it used, the fork runs it serially)
    with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
        return pool.map(tokenize_shard, jobs)


def _on_rank0(comm, rank: int, fn):
    """fn() on rank 0, its result broadcast; an error on rank 0 is raised on every rank."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except UserInputError as err:
            error = str(err)
    if comm is not None:
        result, error = comm.bcast((result, error), root=0)
    if error is not None:
        raise UserInputError(error if rank == 0 else f"rank 0 failed: {error}")
    return result


def build_dataset(cfg: DataConfig) -> Path:
    """Tokenize cfg.corpora into cfg.out_dir; collective over MPI ranks when launched under MPI."""
    comm = mpi_comm(cfg.launcher)
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    check_slurm_world(size, cfg.launcher)
    workers = cfg.workers or (1 if comm is not None else os.cpu_count() or 1)
    tokenizer = Path(cfg.tokenizer)
    with ExitStack() as stack:
        tok = _on_rank0(comm, rank, lambda: tokenizer_info(tokenizer))
        files = {name: [str(p) for p in corpus_files(spec.files, key=f"corpora.{name}.files")] for name, spec in cfg.corpora.items()}
        counts = count_documents(comm, rank, size, sorted({f for fs in files.values() for f in fs}), cfg.text_field)
        counted = {name: [(f, counts[f]) for f in fs] for name, fs in files.items()}
        n_docs = {name: sum(n for _, n in fs) for name, fs in counted.items()}
        for name, n in n_docs.items():
            if n == 0:
                raise UserInputError(f"corpora.{name}: {', '.join(files[name])} hold no text lines")
        tmp = _on_rank0(comm, rank, lambda: str(stack.enter_context(atomic_dir(Path(cfg.out_dir), cfg.overwrite))))
        parts = os.path.join(tmp, "parts")
        os.makedirs(parts, exist_ok=True)
        count = size * workers
        dtype = numpy.dtype(DType.optimal_dtype(tok["vocab_size"])).name
        jobs = [
            ShardJob(
                index=i, count=count, tokenizer_dir=str(tokenizer), files=counted,
                ranges={name: (i * n // count, (i + 1) * n // count) for name, n in n_docs.items()},
                parts_dir=parts, text_field=cfg.text_field, valid_fraction=cfg.valid_fraction,
                batch_size=cfg.batch_size, dtype=dtype, bos_id=tok["bos_id"], eos_id=tok["eos_id"],
            )
            for i in range(rank * workers, (rank + 1) * workers)
        ]
        mine = _run_shards(jobs)
        gathered = comm.gather(mine, root=0) if comm is not None else [mine]
        _on_rank0(comm, rank, lambda: _merge(cfg, tmp, tok, dtype, files, [stats for rank_stats in gathered for stats in rank_stats]))
    return Path(cfg.out_dir)


def _merge(cfg: DataConfig, tmp: str, tok: Dict, dtype: str, files: Dict[str, List[str]], shard_stats: List[Dict]) -> None:
    """Concatenate the shards' partial indexes in shard order; write dataset.json."""
    parts = os.path.join(tmp, "parts")
    corpora, blend = {}, {s: {"prefixes": [], "weights": []} for s in SPLITS}
    for name, spec in cfg.corpora.items():
        entry = {"files": files[name], "weight": spec.weight}
        for split in SPLITS:
            prefix = f"{name}_{split}"
            builder = IndexedDatasetBuilder(get_bin_path(os.path.join(tmp, prefix)), numpy.dtype(dtype).type)
            for shard in range(len(shard_stats)):
                builder.add_index(part_prefix(parts, name, split, shard))
            builder.finalize(get_idx_path(os.path.join(tmp, prefix)))
            counts = {k: sum(s[name][split][k] for s in shard_stats) for k in ("documents", "tokens")}
            entry[split] = dict(prefix=prefix, **counts)
            if counts["documents"] == 0 and (split == "train" or cfg.valid_fraction > 0):
                raise UserInputError(
                    f"corpora.{name}: no {split} documents of {sum(s[name][x]['documents'] for s in shard_stats for x in SPLITS)}; "
                    + ("lower valid_fraction" if split == "train" else "raise valid_fraction (or set it to 0)")
                )
            if counts["documents"]:
                blend[split]["prefixes"].append(prefix)
                blend[split]["weights"].append(spec.weight)
        corpora[name] = entry
    shutil.rmtree(parts)
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok,
        "dtype": dtype,
        "text_field": cfg.text_field,
        "valid_fraction": cfg.valid_fraction,
        "corpora": corpora,
        "blend": {s: (b if b["prefixes"] else None) for s, b in blend.items()},
    }
    Path(tmp, META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    total = {s: sum(c[s]["tokens"] for c in corpora.values()) for s in SPLITS}
    print(f"data: {total['train']} train / {total['valid']} valid tokens in {len(shard_stats)} shards", file=sys.stderr)
