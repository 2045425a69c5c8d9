"""`lep-megatron propagate`: Learned Embedding Propagation (lep-method.md section 4).

Fine-tuning is modelled as I_S = I_B.D and O_S = O_B.U (rows of the input embedding and of the
LM head, d x d maps). The output is the instruct model S's body with the donor A's rows carried
over: embeddings I_A.D, head O_A.U, where
  swap            D = U = identity;
  overlap         D = lstsq(I_B[C], I_S[C]) over the tokens C shared by base and donor;
  conversion      D = lstsq(T.I_B, T.I_S), T the donor's token map over the base tokenizer;
  sum_conversion  as conversion with the rows of T summed instead of averaged;
and U likewise on the heads. The instruct model's added (chat/special) tokens keep its rows.

Streaming: only the embedding/head tensors are read whole, as stored (bfloat16 for most
checkpoints): the base's and the instruct's table of one kind for its fit, then the donor's table
and the output table; the design rows T.I of a fit are made in float64 chunks and folded into the
Gram matrices (solve.py). Every output tensor goes to disk as it is made, S's body tensors one at a
time, so memory never holds more than two tables and a chunk.
"""
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import save_file

from lep_megatron.checkpoint.hf_io import ShardedSafetensorsWriter
from lep_megatron.common.io import UserInputError, atomic_dir, check_out_dir, progress
from lep_megatron.embeddings.initialize import EMBED, HEAD
from lep_megatron.models.hf_config import read_config
from lep_megatron.propagation.inputs import (HFModel, Model, check_compatible, conversion_rows, open_model,
                                             overlap_rows)
from lep_megatron.propagation.solve import SOLVERS, apply_map, fit_map, identity_residual
from lep_megatron.propagation.tokenizer_merge import MergedTokenizer, merge_tokenizers

log = logging.getLogger(__name__)

MODES = ("swap", "overlap", "conversion", "sum_conversion")
TABLES = {EMBED: "embed_tokens", HEAD: "lm_head"}
"""HF tensor name -> the name of its table (and map) in the report and the maps file."""
FIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Table dtypes the fit reads as they are (the segment op's); others are read as float32."""
REPORT_NAME, MAPS_NAME = "propagation_report.json", "propagation_maps.safetensors"


@dataclass
class PropagateConfig:
    """`lep-megatron propagate`: implant a donor's adapted embeddings into an instruct model."""

    base: str
    """HF dir of the base model B the donor was adapted from."""
    instruct: str
    """HF dir of the instruct model S tuned from B: the output's body, chat tokens and template."""
    donor: str
    """The adapted donor A (new tokenizer, embeddings trained on the target language): an HF dir or
    a Megatron checkpoint dir of ours (lep_model.json; e.g. a pretrain checkpoint), whose tokenizer
    is read from its hf/ subdir and whose vocabulary padding is dropped."""
    out_dir: str
    """Output HF model directory (written aside, then renamed)."""
    mode: str = "conversion"
    """swap, overlap, conversion (recommended) or sum_conversion."""
    solver: str = "normal"
    """Float64 least squares: normal (streamed Gram matrices + Cholesky) or qr (streamed QR)."""
    token_map: Optional[str] = None
    """conversion: T of the donor's tokenizer over the base's; null takes the token_map.safetensors
    beside the donor's tokenizer.json (`lep-megatron init` writes one), else builds it."""
    chunk_rows: int = 4096
    """normal solver: rows of T.I averaged, promoted to float64 and folded into the solve at a time."""
    overwrite: bool = False
    """Replace a non-empty out_dir."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserInputError(f"mode={self.mode!r}: choose one of {', '.join(MODES)}")
        if self.solver not in SOLVERS:
            raise UserInputError(f"solver={self.solver!r}: choose one of {', '.join(SOLVERS)}")
        if self.chunk_rows < 1:
            raise UserInputError(f"chunk_rows={self.chunk_rows}: must be >= 1")
        for key in ("base", "instruct", "donor"):
            if not Path(getattr(self, key)).is_dir():
                raise UserInputError(f"{key}={getattr(self, key)} is not a directory")


@dataclass
class FittedTable:
    """One table's map, the instruct rows its added tokens keep, and its report entry."""

    map: Optional[torch.Tensor]
    """float64 [d, d]; None for swap."""
    instruct_rows: torch.Tensor
    """Rows of the instruct table for MergedTokenizer.instruct_rows, in its order."""
    dtype: torch.dtype
    """The instruct table's dtype (the output's)."""
    report: dict
    """Residual, rows used, solver."""


def fit_tables(cfg: PropagateConfig, base: Model, instruct: Model, donor: Model,
               merged: MergedTokenizer) -> Dict[str, FittedTable]:
    rows = None
    if cfg.mode in ("conversion", "sum_conversion"):
        rows = conversion_rows(cfg.token_map, base, donor)
    elif cfg.mode == "overlap":
        rows = overlap_rows(base, donor)
    names = [TABLES[EMBED]] if instruct.shape.tie_word_embeddings else list(TABLES.values())
    fitted = {}
    for name in names:
        head = name == "lm_head"
        x, s_table = base.table(head), instruct.table(head)
        kept = s_table[list(merged.instruct_rows.values())].clone()
        y = s_table[:base.rows]  # leading rows: a contiguous view
        if x.dtype != y.dtype or x.dtype not in FIT_DTYPES:
            x, y = x.float(), y.float()
        if rows is None:
            fitted[name] = FittedTable(None, kept, s_table.dtype, {"residual": identity_residual(x, y),
                                                                   "rows_used": base.rows, "map": "identity"})
        else:
            sol = fit_map(x, y, rows, cfg.solver, cfg.chunk_rows, summed=cfg.mode == "sum_conversion")
            fitted[name] = FittedTable(sol.map, kept, s_table.dtype, {"residual": sol.residual,
                                                                      "rows_used": sol.rows, "solver": sol.solver})
        log.info("propagate %s %s: residual %.3g over %d rows", cfg.mode, name, fitted[name].report["residual"],
                 fitted[name].report["rows_used"])
        del x, y, s_table
    return fitted


def output_table(donor: Model, head: bool, fitted: FittedTable, merged: MergedTokenizer, rows: int) -> torch.Tensor:
    """Donor rows . map, then the instruct model's added tokens with the instruct rows."""
    src = donor.table(head)
    out = torch.empty(rows, src.shape[1], dtype=fitted.dtype)
    apply_map(src, fitted.map, out)
    out[src.shape[0]:] = 0
    del src
    out[list(merged.instruct_rows)] = fitted.instruct_rows
    return out


def propagate(cfg: PropagateConfig) -> Path:
    out_dir = Path(cfg.out_dir)
    check_out_dir(out_dir, cfg.overwrite)
    base, instruct, donor = (open_model(k, getattr(cfg, k)) for k in ("base", "instruct", "donor"))
    for model in (base, instruct):
        if not isinstance(model, HFModel):
            raise UserInputError(f"{model.key}={model.path} is a Megatron checkpoint; only the donor may be one "
                                 "(export it with `lep-megatron convert mcore-to-hf`)")
    check_compatible(base, instruct, donor)
    merged = merge_tokenizers(donor.tokenizer, donor.tokenizer_dir, instruct.tokenizer, instruct.path)
    beyond = [i for i in merged.instruct_rows.values() if i >= instruct.rows]
    if beyond:
        raise UserInputError(f"instruct={instruct.path}: tokenizer.json has added tokens with ids {beyond} beyond "
                             f"its {instruct.rows} embedding rows; tokenizer and weights disagree")
    config = merged.remap_ids(read_config(instruct.path), f"instruct={instruct.path}: config.json")
    gen_path = instruct.path / "generation_config.json"
    gen = merged.remap_ids(json.loads(gen_path.read_text()), str(gen_path)) if gen_path.is_file() else None
    fitted = fit_tables(cfg, base, instruct, donor, merged)

    vocab_size = max(donor.rows, merged.vocab_size)
    names = instruct.reader.keys()
    with atomic_dir(out_dir, cfg.overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp)
        writer.expect((name, (vocab_size, instruct.shape.hidden_size), fitted[TABLES[name]].dtype) if name in TABLES
                      else (name, instruct.reader.shape(name), instruct.reader.dtype(name)) for name in names)
        for name in progress(names, len(names), "propagate: tensors"):
            if name in TABLES:
                writer.add(name, output_table(donor, name == HEAD, fitted[TABLES[name]], merged, vocab_size))
            else:
                writer.add(name, instruct.reader.get(name))
        writer.close()
        (tmp / "config.json").write_text(json.dumps(dict(config, vocab_size=vocab_size), indent=2))
        if gen is not None:
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        merged.save(instruct.path, tmp)
        maps = {name: f.map.contiguous() for name, f in fitted.items() if f.map is not None}
        if maps:
            save_file(maps, str(tmp / MAPS_NAME))
        report = {
            "mode": cfg.mode,
            "solver": cfg.solver if cfg.mode != "swap" else None,
            "tables": {name: f.report for name, f in fitted.items()},
            "tied_embeddings": instruct.shape.tie_word_embeddings,
            "vocab_size": vocab_size,
            "donor_rows": donor.rows,
            "instruct_tokens_kept": {str(o): s for o, s in merged.instruct_rows.items()},
            "config": asdict(cfg),
        }
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return out_dir
