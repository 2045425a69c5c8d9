"""`lep-megatron <stage> [action] [hydra overrides]`: dispatch to each stage's hydra app.

A bare word after the stage (no `=`) is the stage's action, passed as the override
`action=<word>`; e.g. `lep-megatron convert hf-to-mcore in_dir=... out_dir=...`.
"""
import importlib
import logging
import sys

# stage -> module exposing `main()`, a hydra app whose config is conf/<stage>.yaml
STAGES = {
    "convert": "lep_megatron.checkpoint.app",
    "demo": "lep_megatron.demo",
    "init": "lep_megatron.embeddings.app",
    "pretrain": "lep_megatron.training.app",
    "propagate": "lep_megatron.propagation.app",
    "tokenizer": "lep_megatron.tokenizer.app",
    "eval": "lep_megatron.evaluation.app",
    "data": "lep_megatron.data.app",
    "sft-data": "lep_megatron.data.sft_app",
    "calibrate-data": "lep_megatron.data.calibrate_app",
    "pipeline": "lep_megatron.pipeline.app",
}

# hydra writes outputs and log files into the working directory by default; stages write
# their own artifacts into their out_dir and print progress themselves.
HYDRA_SETTINGS = [
    "hydra.output_subdir=null",
    "hydra.run.dir=.",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
]


def usage() -> str:
    lines = ["usage: lep-megatron <stage> [action] [key=value ...]", "stages:"]
    lines += [f"  {name}" for name in STAGES]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"lep-megatron: unknown stage {stage!r}\n{usage()}", file=sys.stderr)
        sys.exit(2)
    if rest and "=" not in rest[0] and not rest[0].startswith("-"):
        rest = [f"action={rest[0]}"] + rest[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    app = importlib.import_module(STAGES[stage])
    sys.argv = [f"lep-megatron {stage}"] + rest + HYDRA_SETTINGS
    app.main()
