"""launch/pretrain.sh as users run it: `sbatch` on the real SLURM of tests/cluster/slurm_up.sh
(CPU nodes: --gpus-per-node=0, gloo) with the default launcher on one node (2 ranks) and on two
nodes (one rank each), and with LAUNCHER=srun (2 tasks), each giving the per-step losses of the
same run under plain torchrun; dry_run read by the python side (nothing launched); calibrate.sh
handing its overrides to pretrain.sh."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.common.launch import torchrun
from lep_megatron.models.tiny import make_hf_model
from tests.cluster.slurm import job_info, node_cpus, sbatch

pytestmark = pytest.mark.megatron
ROOT = Path(__file__).resolve().parents[2]
PRETRAIN_SH = ROOT / "launch" / "pretrain.sh"
TRAIN = ["data.kind=synthetic", "train.steps=2", "train.seq_length=16", "train.micro_batch_size=1",
         "train.global_batch_size=2", "train.warmup_steps=1"]

# srun on one node for the calibrate.sh test: --ntasks-per-node=K (else SLURM_NTASKS) copies
SRUN = """#!/usr/bin/env bash
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
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_hf_model(d / "hf", "llama", vocab_size=131, layers=2)
    run(ConvertConfig("hf-to-mcore", d / "hf", d / "mc"))
    return d


def losses(out_dir: Path):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def reference(tiny):
    """The per-step losses of the same training under plain torchrun, 2 ranks."""
    torchrun(2, ["-m", "lep_megatron", "pretrain", f"checkpoint={tiny / 'mc'}", f"out_dir={tiny / 'ref'}", *TRAIN],
             timeout=600)
    return losses(tiny / "ref")


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.primary_only
@pytest.mark.parametrize("launcher,nodes,tasks_per_node,env", [
    ("torchrun", 1, 1, {"NPROC_PER_NODE": "2"}),  # torchrun with 2 ranks on a CPU node
    ("torchrun", 2, 1, {}),                       # one rank per node: no GPU in the allocation
    ("srun", 1, 2, {}),                           # one srun task per rank
], ids=["torchrun-1node", "torchrun-2nodes", "srun-2tasks"])
def test_sbatch_pretrain_sh(tiny, reference, tmp_path, launcher, nodes, tasks_per_node, env):
    out = tmp_path / "run"
    on_success = tmp_path / "on_success.sh"  # the pipeline's step record, run once training succeeded
    on_success.write_text(f"touch {tmp_path / 'succeeded'}\n")
    cpus = max(1, node_cpus() // tasks_per_node)
    job_env = dict(os.environ, PYTHON=sys.executable, LAUNCHER=launcher, LEP_ON_SUCCESS=str(on_success),
                   OMP_NUM_THREADS="1", **env)
    job = sbatch([f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", f"--cpus-per-task={cpus}",
                  "--gpus-per-node=0", "--time=20", PRETRAIN_SH, f"checkpoint={tiny / 'mc'}", f"out_dir={out}", *TRAIN],
                 cwd=tmp_path, env=job_env, wait=True, timeout=600)
    info = job_info(job)
    output = tmp_path / f"lep-pretrain-{job}.out"  # the job's output file, in the submission directory
    attempt = tmp_path / "logs" / job / "attempt-0"
    log = (attempt / "pretrain.log").read_text() if (attempt / "pretrain.log").exists() else ""
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        info, output.read_text()[-3000:] if output.exists() else "", log[-5000:])
    if nodes == 2:
        assert info["NodeList"] == "n[1-2]"
    assert losses(out) == pytest.approx(reference, abs=1e-6, rel=0)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert "step 2/2 loss" in log and "FutureWarning" not in log
    launch = (attempt / "launch.txt").read_text()
    ranks = 2 // (nodes * tasks_per_node)
    assert f"nodes={nodes} gpus/node=0 tasks/node={tasks_per_node} ranks/task={ranks} cpus/task={cpus}" in launch
    assert "training finished" in output.read_text()
    assert (tmp_path / "succeeded").exists()


@pytest.mark.parametrize("flag", ["dry_run=true", "dry_run=1", "++dry_run=yes"])
def test_dry_run_launches_nothing(tmp_path, flag):
    """dry_run is read by the stage's config, any spelling OmegaConf takes for true; a launch would fail loudly."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "torchrun", "squeue"):
        (bin_dir / name).write_text("#!/usr/bin/env bash\necho launched >&2; exit 99\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable, SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="8",
               LOG_DIR=str(tmp_path / "logs"), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        ["bash", str(PRETRAIN_SH), "model=llama3_8b", f"out_dir={tmp_path / 'run'}", flag, "train.dtype=bfloat16",
         "cluster.nodes=2"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "launched" not in proc.stderr
    # 2 nodes x 8 GPUs: Llama-3-8B (frozen body) data-parallel over all 16
    assert "parallel plan: tp=1 pp=1 dp=16" in proc.stdout and "dry run: nothing launched" in proc.stdout
    assert not (tmp_path / "logs").exists() and not (tmp_path / "run").exists()


def test_dry_run_that_is_not_a_boolean_is_an_error(tmp_path):
    proc = subprocess.run(["bash", str(PRETRAIN_SH), "model=llama3_8b", "out_dir=run", "dry_run=maybe"],
                          env=dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs")),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "dry_run='maybe' is not a boolean" in proc.stderr
    assert not (tmp_path / "logs").exists()


def test_calibrate_sh_passes_finetune_through(tmp_path):
    """launch/calibrate.sh, run as sbatch runs it (a copy of the script; pretrain.sh found under
    SLURM_SUBMIT_DIR), hands finetune=calibration (unless a finetune= is given) and the overrides
    to pretrain.sh: the torchrun launch and the dry run; python is a stand-in recording its argv
    (the config query pretrain.sh makes first goes to the real one)."""
    bin_dir, spool = tmp_path / "bin", tmp_path / "spool"
    bin_dir.mkdir()
    spool.mkdir()
    python = ('#!/usr/bin/env bash\n[ "$2" = lep_megatron.common.config ] && exec "$REAL_PYTHON" "$@"\n'
              'echo "$*" >> "$ARGV"\n')
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("python", python),
                       ("squeue", "#!/usr/bin/env bash\necho 12:00:00\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (spool / "slurm_script").write_text((ROOT / "launch" / "calibrate.sh").read_text())
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="2",
               SLURM_SUBMIT_DIR=str(ROOT), LOG_DIR=str(tmp_path / "logs"), ARGV=str(tmp_path / "argv"),
               REAL_PYTHON=sys.executable)
    common = ["checkpoint=ckpt/lep", "out_dir=runs/calib", "data.dir=data/chat"]
    for extra, pretrain_args in (
            (["train.lr=1e-4"], ["finetune=calibration", *common, "train.lr=1e-4"]),
            (["finetune=sft"], [*common, "finetune=sft"]),
            (["dry_run=true"], ["finetune=calibration", *common, "dry_run=true"])):
        (tmp_path / "argv").unlink(missing_ok=True)
        proc = subprocess.run(["bash", str(spool / "slurm_script"), *common, *extra], env=env, capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (argv,) = (tmp_path / "argv").read_text().splitlines()
        launcher, _, args = (" " + argv).partition(" -m lep_megatron pretrain ")
        assert args.split() == pretrain_args
        if "dry_run=true" in extra:
            assert launcher == ""
        else:
            assert launcher.startswith(" -m lep_megatron.common.agent --nnodes 1 --nproc-per-node 2 "), launcher


def shell_function(name: str, *calls: str) -> list:
    """Run launch/pretrain.sh's bash function NAME on each argument."""
    text = PRETRAIN_SH.read_text()
    body = text[text.index(f"{name}() {{"):]
    body = body[:body.index("\n}\n") + 3]
    script = body + "".join(f'printf "%s|" "$({name} "{c}")"\n' for c in calls)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    return out.split("|")[:len(calls)]


def test_gpu_count_takes_typed_and_empty_values():
    assert shell_function("gpu_count", "8", "h100:8", "gpu:h100:8", "a100:4,v100:2", "", "0", "(null)", "2(x2)") == [
        "8", "8", "8", "6", "0", "0", "0", "2"]


def test_time_limit_in_seconds():
    assert shell_function("to_seconds", "10:00", "1:00:00", "1-00:00:00", "2-03:04:05", "45", "UNLIMITED",
                          "NOT_SET") == ["600", "3600", "86400", str(2 * 86400 + 3 * 3600 + 4 * 60 + 5), "2700", "", ""]
