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
