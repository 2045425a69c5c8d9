"""HF <-> Megatron checkpoint conversion.

hf-to-mcore: one process writes a checkpoint that loads at any TP/PP (dist_checkpointing stores
global tensors and reshards on load; only the vocabulary padding depends on the target TP, so it
is padded for parallel.tp). Under torchrun, each rank builds its own TP/PP shard and reads only
the HF tensors it needs.
mcore-to-hf: one process reads the checkpoint tensor by tensor as whole tensors, whatever TP/PP
wrote it, strips the vocabulary padding and writes size-bounded safetensors shards + config,
tokenizer and generation config.
"""
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import megatron.core
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from lep_megatron.checkpoint.hf_io import (SafetensorsReader, ShardedSafetensorsWriter,
                                           copy_side_files)
from lep_megatron.checkpoint.megatron_io import HF_SUBDIR, CheckpointMeta, CheckpointTensors, save_model
from lep_megatron.common.io import UserInputError, atomic_dir, check_out_dir, progress
from lep_megatron.models import (HFModelShape, StateDictAdapter, build_stage_model,
                                 padded_vocab_size, stage_layer_offset, tp_shard)
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

    def __post_init__(self):
        if self.action not in ("hf-to-mcore", "mcore-to-hf"):
            raise UserInputError(f"action={self.action!r}: use hf-to-mcore or mcore-to-hf")
        if self.dtype is not None:
            parse_dtype(self.dtype)
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
    world = dist.get_world_size() if dist.is_initialized() else 1
    # one process builds the whole model; torchrun ranks build their own shards
    tp, pp = (cfg.tp, cfg.pp) if world > 1 else (1, 1)
    init_distributed(tp, pp)
    padded = padded_vocab_size(shape.vocab_size, cfg.make_vocab_size_divisible_by, cfg.tp)
    model = build_stage_model(shape, padded, dtype, perform_initialization=False)
    adapter = StateDictAdapter(shape, padded)
    offset = stage_layer_offset(shape)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    params = [(k, v) for k, v in model.state_dict().items() if not k.endswith("_extra_state")]
    with torch.no_grad():
        for name, param in progress(params, len(params), "hf-to-mcore tensors"):
            full = adapter.to_megatron(name, offset, reader.get)
            local = tp_shard(name, full, tp_rank, tp)
            if local.shape != param.shape:
                raise UserInputError(f"{in_dir}: tensor for {name} has shape {tuple(local.shape)}, "
                                     f"expected {tuple(param.shape)}: config and weights disagree")
            param.copy_(local.to(dtype))
    hf_config = dict(read_config(in_dir), torch_dtype=dtype_name(dtype))
    meta = CheckpointMeta(hf_config=hf_config, vocab_size=shape.vocab_size, padded_vocab_size=padded,
                          make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
                          dtype=dtype_name(dtype), megatron_core_version=megatron.core.__version__)
    save_model(model, out_dir, meta, hf_side_dir=in_dir, overwrite=cfg.overwrite)
    log.info("wrote %s (vocab %d padded to %d for tp=%d)", out_dir, shape.vocab_size, padded, cfg.tp)
    return out_dir


def mcore_to_hf(cfg: ConvertConfig) -> Path:
    in_dir, out_dir = Path(cfg.in_dir), Path(cfg.out_dir)
    meta = CheckpointMeta.read(in_dir)
    shape = meta.shape
    dtype = parse_dtype(cfg.dtype or meta.dtype)
    check_out_dir(out_dir, cfg.overwrite)
    init_distributed(1, 1)
    # tensor by tensor: peak memory is the shard being written plus one tensor
    state = CheckpointTensors(in_dir)
    adapter = StateDictAdapter(shape, meta.padded_vocab_size)
    with atomic_dir(out_dir, cfg.overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, int(cfg.max_shard_size_gb * 2**30))
        n = shape.num_layers * 9 + 3
        for name, tensor in progress(adapter.to_hf(state), n, "mcore-to-hf tensors"):
            writer.add(name, tensor.to(dtype).clone())
        writer.close()
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
