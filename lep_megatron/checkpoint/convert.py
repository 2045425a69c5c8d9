"""HF <-> Megatron checkpoint conversion.

hf-to-mcore: one process writes a checkpoint that loads at any TP/PP (dist_checkpointing stores
global tensors and reshards on load; only the vocabulary padding depends on the target TP, so it
is padded for parallel.tp). Under torchrun, each rank writes its own TP/PP shard. Either way the
model is never built: the checkpoint is written block by block from the HF files (streaming.py).
mcore-to-hf: one process reads the checkpoint tensor by tensor as whole tensors, whatever TP/PP
wrote it, strips the vocabulary padding and writes size-bounded safetensors shards (each tensor
as soon as it is read) + config, tokenizer and generation config.
"""
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import megatron.core
import torch.distributed as dist

from lep_megatron.checkpoint.hf_io import (SafetensorsReader, ShardedSafetensorsWriter,
                                           copy_side_files)
from lep_megatron.checkpoint.lora_export import ADAPTER_SUBDIR, LoRATensors, MergedLoRA, write_peft_adapter
from lep_megatron.checkpoint.megatron_io import HF_SUBDIR, CheckpointMeta, CheckpointTensors
from lep_megatron.checkpoint.streaming import save_from_hf
from lep_megatron.common.io import UserInputError, atomic_dir, check_out_dir, progress
from lep_megatron.models import HFModelShape, StateDictAdapter, padded_vocab_size
from lep_megatron.models.gpt import check_parallel_fits
from lep_megatron.models.hf_config import dtype_name, parse_dtype, read_config
from lep_megatron.parallel import init_distributed

log = logging.getLogger(__name__)


@dataclass
class ConvertConfig:
    """`lep-megatron convert <action>`: HF <-> Megatron checkpoints."""

    action: str
    """hf-to-mcore or mcore-to-hf."""
    in_dir: str
    """Source checkpoint directory."""
    out_dir: str
    """Destination directory; must be empty unless overwrite=true."""
    dtype: str = None
    """Parameter dtype of the output (float32, bfloat16, float16); default: the input's."""
    tp: int = 1
    """Target tensor parallelism (hf-to-mcore pads the vocabulary for it)."""
    pp: int = 1
    """Target pipeline parallelism (checked against the layer count)."""
    make_vocab_size_divisible_by: int = 128
    """Vocabulary padding granularity per TP rank, as Megatron-LM's flag of that name."""
    max_shard_size_gb: float = 5.0
    """Largest safetensors shard written by mcore-to-hf."""
    overwrite: bool = False
    """Replace a non-empty out_dir."""
    lora: str = "merge"
    """mcore-to-hf of a checkpoint with LoRA adapters: merge (W + (alpha / r) B A into the
    weights) or peft (the weights unmerged, the adapter in out_dir/adapter for peft)."""

    def __post_init__(self):
        if self.action not in ("hf-to-mcore", "mcore-to-hf"):
            raise UserInputError(f"action={self.action!r}: use hf-to-mcore or mcore-to-hf")
        if self.dtype is not None:
            parse_dtype(self.dtype)
        if self.lora not in ("merge", "peft"):
            raise UserInputError(f"lora={self.lora!r}: use merge or peft")
        if self.make_vocab_size_divisible_by < 1:
            raise UserInputError("parallel.make_vocab_size_divisible_by must be >= 1")


def tokenizer_size(model_dir: Path):
    """len(tokenizer) of the tokenizer files in model_dir, or None if there are none."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(str(model_dir)))
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise UserInputError(f"{model_dir}: tokenizer files present but unloadable: {e}") from e


def hf_to_mcore(cfg: ConvertConfig) -> Path:
    in_dir, out_dir = Path(cfg.in_dir), Path(cfg.out_dir)
    shape = HFModelShape.from_dir(in_dir)
    check_parallel_fits(shape, cfg.tp, cfg.pp)
    check_out_dir(out_dir, cfg.overwrite)
    n_tok = tokenizer_size(in_dir)
    if n_tok is not None and n_tok > shape.vocab_size:
        raise UserInputError(
            f"{in_dir}: the tokenizer has {n_tok} tokens but the embedding has {shape.vocab_size} rows "
            "(config.json vocab_size); resize the embeddings (lep-megatron init) before converting"
        )
    dtype = parse_dtype(cfg.dtype or shape.torch_dtype)
    reader = SafetensorsReader(in_dir)
    padded = padded_vocab_size(shape.vocab_size, cfg.make_vocab_size_divisible_by, cfg.tp)
    check_hf_shapes(reader, StateDictAdapter(shape, padded), in_dir)
    init_distributed(1, 1)  # one process writes the global tensors (loadable at any TP/PP) ...
    world = dist.get_world_size()
    if world > 1:  # ... ranks of torchrun / srun each write their own TP/PP shard
        if world % (cfg.tp * cfg.pp):
            raise UserInputError(f"{world} ranks are not a multiple of parallel.tp x parallel.pp = "
                                 f"{cfg.tp * cfg.pp}; launch a multiple of that many, or one process")
        init_distributed(cfg.tp, cfg.pp)
    hf_config = dict(read_config(in_dir), torch_dtype=dtype_name(dtype))
    meta = CheckpointMeta(hf_config=hf_config, vocab_size=shape.vocab_size, padded_vocab_size=padded,
                          make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
                          dtype=dtype_name(dtype), megatron_core_version=megatron.core.__version__)
    save_from_hf(reader, shape, padded, dtype, out_dir, meta, hf_side_dir=in_dir, overwrite=cfg.overwrite)
    log.info("wrote %s (vocab %d padded to %d for tp=%d)", out_dir, shape.vocab_size, padded, cfg.tp)
    return out_dir


def check_hf_shapes(reader: SafetensorsReader, adapter: StateDictAdapter, in_dir: Path) -> None:
    """Every tensor the config implies is there with its shape, before anything is written."""
    s = adapter.shape
    for name, want in adapter.hf_shapes().items():
        got = reader.shape(name)
        if got != want:
            raise UserInputError(
                f"{in_dir}: {name} has shape {got} but config.json implies {want} (vocab_size={s.vocab_size}, "
                f"hidden_size={s.hidden_size}, intermediate_size={s.intermediate_size}, num_attention_heads="
                f"{s.num_attention_heads}, num_key_value_heads={s.num_key_value_heads}, head_dim={s.head_dim}): "
                "config and weights disagree"
            )


def mcore_to_hf(cfg: ConvertConfig) -> Path:
    in_dir, out_dir = Path(cfg.in_dir), Path(cfg.out_dir)
    meta = CheckpointMeta.read(in_dir)
    shape = meta.shape
    dtype = parse_dtype(cfg.dtype or meta.dtype)
    check_out_dir(out_dir, cfg.overwrite)
    init_distributed(1, 1)
    # tensor by tensor: peak memory is one tensor (read) and one row block (converted, written)
    state = CheckpointTensors(in_dir)
    adapter = StateDictAdapter(shape, meta.padded_vocab_size)
    adapters = LoRATensors(state, meta.lora, shape.num_layers) if meta.lora else None
    with atomic_dir(out_dir, cfg.overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, int(cfg.max_shard_size_gb * 2**30))
        n = shape.num_layers * 9 + 3
        weights = MergedLoRA(state, adapters) if adapters and cfg.lora == "merge" else state
        # the layout first (shapes only), so each tensor is written as soon as it is read
        writer.expect((name, t.shape, dtype) for name, t in adapter.to_hf(CheckpointTensors(in_dir, shapes_only=True)))
        for name, tensor in progress(adapter.to_hf(weights), n, "mcore-to-hf tensors"):
            writer.add(name, tensor)
        writer.close()
        if adapters and cfg.lora == "peft":
            write_peft_adapter(adapters, adapter, dtype, tmp / ADAPTER_SUBDIR, base_model=str(out_dir.absolute()))
        copy_side_files(in_dir / HF_SUBDIR, tmp)
        hf_config = dict(meta.hf_config, torch_dtype=dtype_name(dtype))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        if not (tmp / "generation_config.json").is_file():
            write_generation_config(hf_config, tmp)
    log.info("wrote %s", out_dir)
    return out_dir


def write_generation_config(hf_config: dict, out_dir: Path) -> None:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    gen = {k: hf_config[k] for k in keys if hf_config.get(k) is not None}
    (Path(out_dir) / "generation_config.json").write_text(json.dumps(gen, indent=2))


def run(cfg: ConvertConfig) -> Path:
    return hf_to_mcore(cfg) if cfg.action == "hf-to-mcore" else mcore_to_hf(cfg)
