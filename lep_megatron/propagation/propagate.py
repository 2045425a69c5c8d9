"""`lep-megatron propagate`: Learned Embedding Propagation (lep-method.md section 4).

Fine-tuning is modelled as I_S = I_B.D and O_S = O_B.U (rows of the input embedding and of the
LM head, d x d maps). The output is the instruct model S's body with the donor A's rows carried
over: embeddings I_A.D, head O_A.U, where
  swap            D = U = identity;
  overlap         D = lstsq(I_B[C], I_S[C]) over the tokens C shared by base and donor;
  conversion      D = lstsq(T.I_B, T.I_S), T the donor's token map over the base tokenizer;
  sum_conversion  as conversion with the rows of T summed instead of averaged;
and U likewise on the heads. The instruct model's added (chat/special) tokens keep its rows.

Streaming: only the embedding/head tensors are read whole (two tables at a time for the fit,
then the donor's and the output table); S's body tensors are copied through one at a time.
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
from lep_megatron.propagation.inputs import Model, check_compatible, conversion_rows, overlap_rows
from lep_megatron.propagation.solve import SOLVERS, apply_map, fit_map, identity_residual
from lep_megatron.propagation.tokenizer_merge import MergedTokenizer, merge_tokenizers

log = logging.getLogger(__name__)

MODES = ("swap", "overlap", "conversion", "sum_conversion")
TABLES = {"embed_tokens": EMBED, "lm_head": HEAD}
REPORT_NAME, MAPS_NAME = "propagation_report.json", "propagation_maps.safetensors"


@dataclass
class PropagateConfig:
    """`lep-megatron propagate`: implant a donor's adapted embeddings into an instruct model."""

    base: str
    """HF dir of the base model B the donor was adapted from."""
    instruct: str
    """HF dir of the instruct model S tuned from B: the output's body, chat tokens and template."""
    donor: str
    """HF dir of the adapted donor A (new tokenizer, embeddings trained on the target language)."""
    out_dir: str
    """Output HF model directory (written aside, then renamed)."""
    mode: str = "conversion"
    """swap, overlap, conversion (recommended) or sum_conversion."""
    solver: str = "normal"
    """Float64 least squares: normal (streamed Gram matrices + Cholesky) or qr (streamed QR)."""
    token_map: Optional[str] = None
    """conversion: T of the donor's tokenizer over the base's; null takes the donor dir's
    token_map.safetensors (written by `lep-megatron init`), else builds it."""
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
    names = ["embed_tokens"] if instruct.shape.tie_word_embeddings else list(TABLES)
    fitted = {}
    for name in names:
        head = name == "lm_head"
        x = base.table(head).float().contiguous()
        s_table = instruct.table(head)
        kept = s_table[list(merged.instruct_rows.values())].clone()
        y = s_table[:base.rows].float().contiguous()
        dtype = s_table.dtype
        del s_table
        if rows is None:
            fitted[name] = FittedTable(None, kept, dtype, {"residual": identity_residual(x, y),
                                                           "rows_used": base.rows, "map": "identity"})
        else:
            sol = fit_map(x, y, rows, cfg.solver, cfg.chunk_rows, summed=cfg.mode == "sum_conversion")
            fitted[name] = FittedTable(sol.map, kept, dtype, {"residual": sol.residual, "rows_used": sol.rows,
                                                              "solver": sol.solver})
        log.info("propagate %s %s: residual %.3g over %d rows", cfg.mode, name, fitted[name].report["residual"],
                 fitted[name].report["rows_used"])
        del x, y
    return fitted


def output_table(donor: Model, head: bool, fitted: FittedTable, merged: MergedTokenizer) -> torch.Tensor:
    """Donor rows . map, then the instruct model's added tokens with the instruct rows."""
    src = donor.table(head)
    out = torch.zeros(max(src.shape[0], merged.vocab_size), src.shape[1], dtype=fitted.dtype)
    apply_map(src, fitted.map, out)
    del src
    out[list(merged.instruct_rows)] = fitted.instruct_rows
    return out


def propagate(cfg: PropagateConfig) -> Path:
    out_dir = Path(cfg.out_dir)
    check_out_dir(out_dir, cfg.overwrite)
    base, instruct, donor = (Model.open(k, getattr(cfg, k)) for k in ("base", "instruct", "donor"))
    check_compatible(base, instruct, donor)
    merged = merge_tokenizers(donor.tokenizer, donor.path, instruct.tokenizer, instruct.path)
    beyond = [i for i in merged.instruct_rows.values() if i >= instruct.rows]
    if beyond:
        raise UserInputError(f"instruct={instruct.path}: tokenizer.json has added tokens with ids {beyond} beyond "
                             f"its {instruct.rows} embedding rows; tokenizer and weights disagree")
    config = merged.remap_ids(read_config(instruct.path), f"instruct={instruct.path}: config.json")
    gen_path = instruct.path / "generation_config.json"
    gen = merged.remap_ids(json.loads(gen_path.read_text()), str(gen_path)) if gen_path.is_file() else None
    fitted = fit_tables(cfg, base, instruct, donor, merged)

    with atomic_dir(out_dir, cfg.overwrite) as tmp:
        # shards of 2 GiB hold one 8B-sized table each: one pending table at a time, not two
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=2 * 2**30)
        names = instruct.reader.keys()
        vocab_size = None
        for name in progress(names, len(names), "propagate: tensors"):
            if name in (EMBED, HEAD):
                table = output_table(donor, name == HEAD, fitted["lm_head" if name == HEAD else "embed_tokens"],
                                     merged)
                vocab_size = table.shape[0]
                writer.add(name, table)
                del table
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
