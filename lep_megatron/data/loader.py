"""The trainer's side of the data stage: Megatron GPTDatasets over a `lep-megatron data` dir.

The data dir's dataset.json names the tokenizer that built it; a trainer given another
tokenizer gets a UserInputError instead of training on ids that mean other tokens.
"""
import errno
import json
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.tokenizers import MegatronTokenizerBase
from transformers import AutoTokenizer

from lep_megatron.common.io import UserInputError
from lep_megatron.data.build import FORMAT_VERSION, META_FILE
from lep_megatron.tokenizer.token_map import tokenizer_fingerprint

# megatron-core's "no pad token" id (megatron_dataset._PAD_TOKEN_ID): never a real token
NO_PAD_ID = -1


class HFMegatronTokenizer(MegatronTokenizerBase):
    """An HF tokenizer dir as the tokenizer megatron's GPTDataset expects."""

    def __init__(self, tokenizer_dir: Path):
        super().__init__(str(tokenizer_dir), {})
        self.hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if self.hf.eos_token_id is None:
            raise UserInputError(f"tokenizer={tokenizer_dir}: tokenizer_config.json names no eos_token")
        self.fingerprint = tokenizer_fingerprint(tokenizer_dir)
        # megatron hashes these into its index-cache names
        self.unique_identifiers = OrderedDict([("class", type(self).__name__), ("fingerprint", self.fingerprint)])

    def tokenize(self, text: str) -> List[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def detokenize(self, ids: List[int]) -> str:
        return self.hf.decode(list(ids), clean_up_tokenization_spaces=False)

    @property
    def vocab(self) -> Dict[str, int]:
        return self.hf.get_vocab()

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eod(self) -> int:
        return self.hf.eos_token_id

    @property
    def bos(self) -> Optional[int]:
        return self.hf.bos_token_id

    @property
    def pad(self) -> int:
        return NO_PAD_ID if self.hf.pad_token_id is None else self.hf.pad_token_id

    def apply_chat_template(self, conversation, **kwargs):
        return self.hf.apply_chat_template(conversation, **kwargs)


def read_metadata(data_dir: Path) -> Dict:
    """dataset.json of a data dir, checked for the fields the loader relies on."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise UserInputError(f"data dir {data_dir}: no {META_FILE}; build it with `lep-megatron data`")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION or "tokenizer" not in meta or "blend" not in meta:
        raise UserInputError(f"{path}: format {meta.get('format_version')!r} is not {FORMAT_VERSION!r}; rebuild with `lep-megatron data`")
    return meta


def check_tokenizer(meta: Dict, tokenizer: HFMegatronTokenizer, data_dir: Path) -> None:
    """Refuse data built with another tokenizer (compared by fingerprint)."""
    built = meta["tokenizer"]
    if built["fingerprint"] != tokenizer.fingerprint:
        raise UserInputError(
            f"{Path(data_dir) / META_FILE}: the data was built with tokenizer {built['path']} "
            f"(vocab {built['vocab_size']}, fingerprint {built['fingerprint'][:12]}), but the trainer's tokenizer is "
            f"{tokenizer.path} (vocab {tokenizer.vocab_size}, fingerprint {tokenizer.fingerprint[:12]}); "
            f"rebuild the data with `lep-megatron data tokenizer={tokenizer.path}` or train with the tokenizer that built it"
        )


def _blend(meta: Dict, split: str, data_dir: Path) -> Optional[Tuple[List[str], Optional[List[float]]]]:
    blend = meta["blend"][split]
    if blend is None:
        return None
    prefixes = [str(Path(data_dir).absolute() / p) for p in blend["prefixes"]]
    # megatron: a single dataset takes no weights
    return prefixes, (blend["weights"] if len(prefixes) > 1 else None)


def build_gpt_datasets(
    data_dir: Path,
    tokenizer_dir: Path,
    seq_length: int,
    train_samples: int,
    valid_samples: Optional[int],
    seed: int = 1234,
    cache_dir: Optional[Path] = None,
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> Tuple[GPTDataset, Optional[GPTDataset]]:
    """(train, valid) GPTDatasets (BlendedDatasets for several corpora) of seq_length tokens.

    valid is None when the data has no valid split or valid_samples is None. Call on every rank
    after torch.distributed is initialized (megatron-core 0.16's BlendedDataset asks for the rank);
    is_built_on_rank says which ranks build (the others get None), as in megatron's builder.

    cache_dir (pretrain's data.cache_dir): megatron's path_to_cache, where rank 0 writes the
    document / sample / shuffle indexes (GPTDataset) and the blend indexes (BlendedDataset), and
    where every rank then reads them; a later run with the same data, seed, lengths and sizes
    reuses them. None: megatron's default, beside the .bin files
    (<data_dir>/<corpus>_<split>/cache/GPTDataset_indices; a blend is then not cached); set it for
    a read-only data dir. It must be a dir every node sees (the other ranks read rank 0's files).
    """
    if seq_length < 1 or train_samples < 1:
        raise UserInputError(f"seq_length={seq_length} and train_samples={train_samples} must be >= 1")
    meta = read_metadata(data_dir)
    tokenizer = HFMegatronTokenizer(tokenizer_dir)
    check_tokenizer(meta, tokenizer, data_dir)
    # no validation wanted (valid_samples None): megatron refuses a weighted blend without a size
    valid = _blend(meta, "valid", data_dir) if valid_samples is not None else None
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[_blend(meta, "train", data_dir), valid, None],
        path_to_cache=str(Path(cache_dir).absolute()) if cache_dir else None,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    sizes = [train_samples, valid_samples if valid else None, None]
    try:
        train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank, config).build()
    except Exception as err:
        # megatron wraps rank 0's OSError in a bare Exception ("Failed to write dataset materials ...")
        cause = err if isinstance(err, OSError) else err.__cause__
        if not (isinstance(cause, PermissionError) or getattr(cause, "errno", None) == errno.EROFS):
            raise
        where = f"data.cache_dir={cache_dir}" if cache_dir else f"the data dir {data_dir} (data.cache_dir=null)"
        raise UserInputError(
            f"cannot write megatron's dataset index cache in {where}: {cause}; "
            "set data.cache_dir=DIR to a writable dir that every node sees") from err
    return train_ds, valid_ds
