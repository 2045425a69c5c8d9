"""launch/pretrain.sh under a simulated SLURM allocation (SLURM_* set, srun and scontrol shimmed):
torchrun per node, and one srun task per rank with the ranks taken from SLURM; dry_run=true plans
in the script's own process and launches nothing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.models.tiny import make_hf_model

pytestmark = pytest.mark.megatron
ROOT = Path(__file__).resolve().parents[2]

SRUN = """#!/usr/bin/env bash
# srun on one node: --ntasks-per-node=K (else SLURM_NTASKS) copies, each with its SLURM rank
tasks=${SLURM_NTASKS:-1}
while [[ "$1" == --* ]]; do
  case "$1" in --ntasks-per-node=*) tasks=${1#*=} ;; esac
  shift
done
for ((i = 0; i < tasks; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & done
status=0
for job in $(jobs -p); do wait "$job" || status=$?; done
exit $status
"""
SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && echo localhost
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    make_hf_model(d / "hf", "llama", vocab_size=131, layers=2)
    run(ConvertConfig("hf-to-mcore", d / "hf", d / "mc"))
    shims = d / "bin"
    shims.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    slurm = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", PYTHON=sys.executable, SLURM_JOB_ID="4242",
                 SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="2",
                 OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return d, slurm


@pytest.mark.parametrize("launcher,extra", [("torchrun", {}), ("srun", {"SLURM_NTASKS": "2"})])
def test_pretrain_sh_under_slurm(env, tmp_path, launcher, extra):
    d, slurm = env
    out = tmp_path / "run"
    on_success = tmp_path / "on_success.sh"  # the pipeline's step record, run once training succeeded
    on_success.write_text(f"touch {tmp_path / 'succeeded'}\n")
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "pretrain.sh"), f"checkpoint={d / 'mc'}", f"out_dir={out}",
         "data.kind=synthetic", "train.steps=2", "train.seq_length=16", "train.micro_batch_size=1",
         "train.global_batch_size=2", "train.warmup_steps=1"],
        env=dict(slurm, LAUNCHER=launcher, LOG_DIR=str(tmp_path / "logs"), LEP_ON_SUCCESS=str(on_success), **extra),
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = (tmp_path / "logs" / "pretrain.log")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + (log.read_text()[-3000:] if log.exists() else "")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert json.loads((out / "train_config.json").read_text())["global_batch_size"] == 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert "step 2/2 loss" in log.read_text()
    assert (tmp_path / "succeeded").exists()


def test_dry_run_launches_nothing(env, tmp_path):
    d, slurm = env
    (tmp_path / "bin").mkdir()
    for name in ("srun", "torchrun"):  # any launch fails loudly
        (tmp_path / "bin" / name).write_text("#!/usr/bin/env bash\necho launched >&2; exit 99\n")
        (tmp_path / "bin" / name).chmod(0o755)
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "pretrain.sh"), "model=llama3_8b", f"out_dir={tmp_path / 'run'}",
         "dry_run=true", "train.dtype=bfloat16", "cluster.nodes=2"],
        env=dict(slurm, PATH=f"{tmp_path / 'bin'}:{slurm['PATH']}", LOG_DIR=str(tmp_path / "logs")),
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "launched" not in proc.stderr
    # 2 nodes x 8 GPUs: Llama-3-8B (frozen body) data-parallel over all 16
    assert "parallel plan: tp=1 pp=1 dp=16" in proc.stdout and "dry run: nothing launched" in proc.stdout
    assert not (tmp_path / "logs").exists() and not (tmp_path / "run").exists()


def test_calibrate_sh_passes_finetune_through(tmp_path):
    """launch/calibrate.sh, run as sbatch runs it (a copy of the script; pretrain.sh found under
    SLURM_SUBMIT_DIR), hands finetune=calibration (unless a finetune= is given) and the overrides
    to pretrain.sh: the torchrun launch and the dry run; python is a stand-in recording its argv."""
    bin_dir, spool = tmp_path / "bin", tmp_path / "spool"
    bin_dir.mkdir()
    spool.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("python", '#!/usr/bin/env bash\necho "$*" >> "$ARGV"\n')):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (spool / "slurm_script").write_text((ROOT / "launch" / "calibrate.sh").read_text())
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="2",
               SLURM_SUBMIT_DIR=str(ROOT), LOG_DIR=str(tmp_path / "logs"), ARGV=str(tmp_path / "argv"))
    common = ["checkpoint=ckpt/lep", "out_dir=runs/calib", "data.dir=data/chat"]
    for extra, pretrain_args in (
            (["train.lr=1e-4"], ["finetune=calibration", *common, "train.lr=1e-4"]),
            (["finetune=sft"], [*common, "finetune=sft"]),
            (["dry_run=true"], ["finetune=calibration", *common, "dry_run=true"])):
        (tmp_path / "argv").unlink(missing_ok=True)
        proc = subprocess.run(["bash", str(spool / "slurm_script"), *common, *extra], env=env, capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (argv,) = (tmp_path / "argv").read_text().splitlines()
        launcher, _, args = (" " + argv).partition(" -m lep_megatron pretrain ")
        assert args.split() == pretrain_args
        assert launcher.startswith(" -m torch.distributed.run --nnodes 1 --nproc-per-node 2") if "dry_run=true" not in extra else launcher == ""
