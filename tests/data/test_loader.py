"""The trainer's loader: megatron GPTDatasets over a built data dir whose samples are windows
of bos + document + eos runs, blended by the recorded weights, and a refusal of data built with
another tokenizer."""
from pathlib import Path

import numpy
import pytest

from lep_megatron.common.io import UserInputError

pytestmark = pytest.mark.megatron

SEQ = 64


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-process gloo group, as the trainer has (megatron-core 0.16's BlendedDataset asks for the rank)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def datasets(process_group, built, new_tokenizer, tmp_path_factory):
    from lep_megatron.data.loader import build_gpt_datasets

    cache = tmp_path_factory.mktemp("cache")
    return build_gpt_datasets(built, new_tokenizer, seq_length=SEQ, train_samples=400, valid_samples=40, cache_dir=cache)


def split_documents(corpora, split: str) -> dict:
    from lep_megatron.data.build import is_valid_document
    from lep_megatron.tokenizer.corpus import iter_documents

    return {
        name: {d for d in iter_documents([Path(f) for f in spec["files"]]) if is_valid_document(d, 0.05) == (split == "valid")}
        for name, spec in corpora.items()
    }


def check_samples(dataset, n: int, docs: dict, tokenizer) -> dict:
    """Every sample: labels are tokens shifted by one, every eos is followed by bos, and every
    complete bos ... eos run decodes to a document of this split. Returns runs per corpus."""
    bos, eos = tokenizer.bos, tokenizer.eod
    found = {name: 0 for name in docs}
    for i in range(n):
        sample = dataset[i]
        tokens, labels = sample["tokens"].numpy(), sample["labels"].numpy()
        assert tokens.shape == labels.shape == (SEQ,)
        numpy.testing.assert_array_equal(tokens[1:], labels[:-1])
        seq = numpy.append(tokens, labels[-1]).tolist()
        assert all(seq[j + 1] == bos for j in range(len(seq) - 1) if seq[j] == eos)
        starts = [j for j, t in enumerate(seq) if t == bos]
        for start in starts:
            if eos in seq[start:]:
                end = seq.index(eos, start)
                text = tokenizer.detokenize(seq[start + 1:end])
                owners = [name for name, texts in docs.items() if text in texts]
                assert owners, f"sample {i}: {text!r} is no document of this split"
                assert seq[start + 1:end] == tokenizer.tokenize(text)
                found[owners[0]] += 1
    return found


def test_train_samples_are_corpus_documents_blended_by_weight(datasets, corpora, new_tokenizer):
    from lep_megatron.data.loader import HFMegatronTokenizer

    train, _ = datasets
    assert len(train) == 400
    found = check_samples(train, len(train), split_documents(corpora, "train"), HFMegatronTokenizer(new_tokenizer))
    # weights 3:1 -> about 300 samples from fortunes, 100 from manuals (manuals lines are longer)
    assert found["fortunes"] > 0 and found["manuals"] > 0
    names = [train.dataset_index[i] for i in range(len(train))]
    assert names.count(0) == 300 and names.count(1) == 100


def test_valid_samples_are_held_out_documents(datasets, corpora, new_tokenizer):
    from lep_megatron.data.loader import HFMegatronTokenizer

    _, valid = datasets
    found = check_samples(valid, len(valid), split_documents(corpora, "valid"), HFMegatronTokenizer(new_tokenizer))
    assert sum(found.values()) > 0


def test_data_of_another_tokenizer_is_refused(built, originals_dir, tmp_path):
    from lep_megatron.data.loader import build_gpt_datasets

    mistral = originals_dir("mistral-7b")
    with pytest.raises(UserInputError) as err:
        build_gpt_datasets(built, mistral, seq_length=SEQ, train_samples=10, valid_samples=2, cache_dir=tmp_path)
    message = str(err.value)
    assert str(built / "dataset.json") in message and "(vocab 2000," in message and "(vocab 32000," in message
    assert f"rebuild the data with `lep-megatron data tokenizer={mistral}`" in message


def test_missing_data_dir_is_refused(new_tokenizer, tmp_path):
    from lep_megatron.data.loader import build_gpt_datasets

    with pytest.raises(UserInputError, match="no dataset.json; build it with `lep-megatron data`"):
        build_gpt_datasets(tmp_path, new_tokenizer, seq_length=SEQ, train_samples=10, valid_samples=2)


def tree(root: Path) -> dict:
    """Every file and dir under root: relative path -> (size, mtime in ns) (dirs: size None)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def cache_names(files) -> list:
    """Megatron's cache file names without their hash prefix: Class-split-what."""
    return sorted(name.split("-", 1)[1] for name in files)


INDEX_FILES = ["description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy"]
BLEND_FILES = ["dataset_index.npy", "dataset_sample_index.npy", "description.txt"]


def copy_of(built: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(built, tmp_path / "data"))


def test_cache_dir_leaves_the_data_dir_untouched_and_is_reused(process_group, built, new_tokenizer, tmp_path):
    """data.cache_dir for a read-only (shared) data dir: nothing is written under the data dir,
    megatron's index files land in cache_dir, and a second build with the same cache_dir reads
    them instead of writing them again. (The tests run as root, whom chmod does not stop, so the
    data dir's files and mtimes are compared instead of making it read-only.)"""
    from lep_megatron.data.loader import build_gpt_datasets

    data, cache = copy_of(built, tmp_path), tmp_path / "cache"
    before = tree(data)
    args = dict(seq_length=SEQ, train_samples=400, valid_samples=40, cache_dir=cache)
    train, valid = build_gpt_datasets(data, new_tokenizer, **args)
    assert tree(data) == before
    cached = tree(cache)
    # per corpus and split a GPTDataset's indexes (2 corpora x train, valid), per split the blend's
    assert cache_names(cached) == sorted(
        [f"GPTDataset-{split}-{f}" for split in ("train", "valid") for f in INDEX_FILES for _ in range(2)]
        + [f"BlendedDataset-{split}-{f}" for split in ("train", "valid") for f in BLEND_FILES])
    # each corpus's description names its .bin/.idx prefix in the data dir
    described = [(cache / name).read_text() for name in cached if "GPTDataset-train-description" in name]
    assert sorted(c for d in described for c in ("fortunes", "manuals") if f'"{data / c}_train"' in d) == ["fortunes", "manuals"]

    again_train, again_valid = build_gpt_datasets(data, new_tokenizer, **args)
    assert tree(cache) == cached and tree(data) == before  # read back, not rewritten
    assert [again_train.dataset_index[i] for i in range(400)] == [train.dataset_index[i] for i in range(400)]
    for first, second in ((train, again_train), (valid, again_valid)):
        for i in (0, 7, len(first) - 1):
            numpy.testing.assert_array_equal(first[i]["tokens"].numpy(), second[i]["tokens"].numpy())


def test_without_cache_dir_megatron_writes_inside_the_data_dir(process_group, built, new_tokenizer, tmp_path):
    """data.cache_dir=null keeps megatron's default: each corpus's indexes beside its .bin file,
    in <data>/<corpus>_<split>/cache/GPTDataset_indices (the blend's are not cached)."""
    from lep_megatron.data.loader import build_gpt_datasets

    data = copy_of(built, tmp_path)
    before = tree(data)
    build_gpt_datasets(data, new_tokenizer, seq_length=SEQ, train_samples=400, valid_samples=40)
    added = sorted(set(tree(data)) - set(before))
    written = [Path(p) for p in added if p.endswith((".npy", ".txt"))]
    assert sorted({str(p.parent) for p in written}) == [
        f"{name}_{split}/cache/GPTDataset_indices" for name in ("fortunes", "manuals") for split in ("train", "valid")]
    assert cache_names(p.name for p in written) == sorted(
        f"GPTDataset-{split}-{f}" for split in ("train", "valid") for f in INDEX_FILES for _ in range(2))
    assert set(before) <= set(tree(data)) and all(tree(data)[k] == v for k, v in before.items())


@pytest.mark.parametrize("with_cache_dir", [False, True])
def test_unwritable_cache_is_a_clear_error(process_group, built, new_tokenizer, tmp_path, monkeypatch, with_cache_dir):
    """A cache dir that cannot be written (a read-only data dir, by default) names data.cache_dir.
    As root, chmod does not stop writes, so os.makedirs refuses under the unwritable dir as a
    read-only filesystem would (EROFS)."""
    import errno
    import os

    from lep_megatron.data.loader import build_gpt_datasets

    data = copy_of(built, tmp_path)
    locked = tmp_path / "cache" if with_cache_dir else data
    makedirs = os.makedirs

    def read_only(path, *args, **kwargs):
        if Path(path).absolute().is_relative_to(locked):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(UserInputError) as err:
        build_gpt_datasets(data, new_tokenizer, seq_length=SEQ, train_samples=10, valid_samples=2,
                           cache_dir=locked if with_cache_dir else None)
    where = f"data.cache_dir={locked}" if with_cache_dir else f"the data dir {data} (data.cache_dir=null)"
    assert str(err.value).startswith(f"cannot write megatron's dataset index cache in {where}: [Errno 30] Read-only file system")
    assert str(err.value).endswith("set data.cache_dir=DIR to a writable dir that every node sees")
