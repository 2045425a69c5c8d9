"""`lep-megatron init`: a base HF checkpoint + a new tokenizer -> a checkpoint whose input
embeddings and LM head have the new vocabulary, each new row the mean of the original rows its
text splits into (I_new = T.I_old, O_new = T.O_old; lep-method.md section 2). The body tensors are
copied through untouched, shard by shard.

Rules beyond the token map itself:
- untrained original rows (norm below `untrained_norm`, e.g. Llama-3's reserved specials) are
  never averaged in;
- a new row with nothing left to average (no decomposition, an unknown special token, only
  untrained parts) gets the mean of all trained original rows;
- `wmean` weighs sub-token i by exp(-decay * i) and whitespace-only sub-tokens by 0.1; `random`
  copies the rows of tokens shared with the original and draws the others from N(0, std of the
  original table), the baseline the paper compares against.
"""
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from lep_megatron.checkpoint.hf_io import SIDE_FILES, SafetensorsReader, ShardedSafetensorsWriter, copy_side_files
from lep_megatron.common.io import UserInputError, atomic_dir, check_out_dir, progress
from lep_megatron.models.hf_config import HFModelShape, read_config
from lep_megatron.ops import segment_mean
from lep_megatron.tokenizer.token_map import TokenMap, build_token_map, tokenizer_fingerprint

log = logging.getLogger(__name__)

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
METHODS = ("mean", "wmean", "random")


@dataclass
class InitConfig:
    """`lep-megatron init`: resize and initialize a base model's embeddings for a new tokenizer."""

    base: str
    """HF base model directory; its tokenizer is the original the token map refers to."""
    tokenizer: str
    """New tokenizer directory (tokenizer.json), e.g. from `lep-megatron tokenizer extend`."""
    out_dir: str
    """Output HF model directory (written aside, then renamed)."""
    token_map: Optional[str] = None
    """A token_map.safetensors built for `tokenizer` against the base tokenizer; null builds
    it here (with the untrained rows of the base excluded)."""
    method: str = "mean"
    """mean (the paper), wmean (decaying weights over sub-token position) or random (baseline)."""
    wmean_decay: float = 0.5
    """wmean: weight exp(-decay * i) for the i-th sub-token."""
    untrained_norm: float = 1e-12
    """Original rows whose input or output norm is below this are untrained and never averaged."""
    seed: int = 0
    """random: generator seed."""
    overwrite: bool = False
    """Replace a non-empty out_dir."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserInputError(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        for key in ("base", "tokenizer"):
            if not Path(getattr(self, key)).is_dir():
                raise UserInputError(f"{key}={getattr(self, key)} is not a directory")
        if not (Path(self.tokenizer) / "tokenizer.json").is_file():
            raise UserInputError(f"tokenizer={self.tokenizer} has no tokenizer.json; "
                                 "make one with `lep-megatron tokenizer train|extend`")


def load_or_build_token_map(cfg: InitConfig, untrained: torch.Tensor) -> TokenMap:
    weighting = "wmean" if cfg.method == "wmean" else "mean"
    if cfg.token_map is None:
        return build_token_map(Path(cfg.tokenizer), Path(cfg.base), exclude_old_ids=untrained.tolist(),
                               weighting=weighting, wmean_decay=cfg.wmean_decay)
    tm = TokenMap.load(Path(cfg.token_map))
    made_for = tm.meta.get("new_tokenizer")
    if made_for and made_for != tokenizer_fingerprint(Path(cfg.tokenizer)):
        raise UserInputError(f"token_map={cfg.token_map} was built for another tokenizer than "
                             f"tokenizer={cfg.tokenizer}; rebuild it or pass token_map=null")
    stored = tm.meta.get("method", "mean").split("(")[0]
    if cfg.method != "random" and stored != weighting:
        raise UserInputError(f"token_map={cfg.token_map} holds {stored} weights but method={cfg.method}; "
                             "pass token_map=null to build the map for this method")
    return tm


def new_tables(cfg: InitConfig, old_in: torch.Tensor, old_out: torch.Tensor):
    """(new input table, new output table, report) for the configured method."""
    norms_in, norms_out = old_in.float().norm(dim=1), old_out.float().norm(dim=1)
    untrained = torch.nonzero((norms_in < cfg.untrained_norm) | (norms_out < cfg.untrained_norm)).flatten()
    tm = load_or_build_token_map(cfg, untrained)
    if tm.old_vocab_size > old_in.shape[0]:
        raise UserInputError(f"token map refers to {tm.old_vocab_size} original tokens but {cfg.base} has "
                             f"{old_in.shape[0]} embedding rows")
    trained = torch.ones(old_in.shape[0], dtype=torch.bool)
    trained[untrained] = False
    weights = torch.where(trained[tm.indices], tm.weights, 0.0)
    new_in, new_out = segment_mean(old_in.contiguous(), old_out.contiguous(), tm.offsets, tm.indices, weights)

    lengths = tm.offsets.diff()
    mass = torch.zeros(tm.new_vocab_size).index_add_(
        0, torch.repeat_interleave(torch.arange(tm.new_vocab_size), lengths), weights)
    fallback = mass == 0
    copied = (lengths == 1) & ~fallback
    if cfg.method == "random":
        g = torch.Generator().manual_seed(cfg.seed)
        drawn = ~copied
        for new, old in ((new_in, old_in), (new_out, old_out)):
            std = old[trained].float().std()
            new[drawn] = (torch.randn(int(drawn.sum()), old.shape[1], generator=g) * std).to(new.dtype)
    else:
        for new, old in ((new_in, old_in), (new_out, old_out)):
            new[fallback] = old[trained].float().mean(dim=0).to(new.dtype)
    report = {
        "method": cfg.method,
        "old_vocab_size": int(old_in.shape[0]),
        "new_vocab_size": tm.new_vocab_size,
        "rows_copied": int(copied.sum()),
        "rows_averaged": int(((lengths > 1) & ~fallback).sum()),
        "rows_fallback_mean": int(fallback.sum()) if cfg.method != "random" else 0,
        "rows_random": int((~copied).sum()) if cfg.method == "random" else 0,
        "untrained_original_rows": untrained.tolist(),
        "token_map": tm.meta,
    }
    return new_in, new_out, tm, report


def special_token_ids(tokenizer_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def initialize(cfg: InitConfig) -> Path:
    base, out_dir = Path(cfg.base), Path(cfg.out_dir)
    check_out_dir(out_dir, cfg.overwrite)
    shape = HFModelShape.from_dir(base)
    reader = SafetensorsReader(base)
    old_in = reader.get(EMBED)
    old_out = old_in if shape.tie_word_embeddings else reader.get(HEAD)
    new_in, new_out, tm, report = new_tables(cfg, old_in, old_out)
    log.info("init %s: %d -> %d rows (%d copied, %d averaged, %d fallback)", cfg.method, report["old_vocab_size"],
             report["new_vocab_size"], report["rows_copied"], report["rows_averaged"], report["rows_fallback_mean"])

    with atomic_dir(out_dir, cfg.overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp)
        names = reader.keys()
        for name in progress(names, len(names), "init: tensors"):
            if name == EMBED:
                writer.add(name, new_in)
            elif name == HEAD:
                writer.add(name, new_out)
            else:
                writer.add(name, reader.get(name))
        writer.close()
        specials = special_token_ids(Path(cfg.tokenizer))
        config = dict(read_config(base), vocab_size=tm.new_vocab_size, **specials)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_side_files(Path(cfg.tokenizer), tmp, [f for f in SIDE_FILES if f != "generation_config.json"])
        gen = json.loads((base / "generation_config.json").read_text()) if (base / "generation_config.json").is_file() else {}
        gen.update(specials)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        tm.save(tmp / "token_map.safetensors")
        (tmp / "init_report.json").write_text(json.dumps(dict(report, config=asdict(cfg)), indent=2))
    return out_dir
