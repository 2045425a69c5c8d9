"""The cluster of tests/cluster/slurm_up.sh: a 2-node job runs its srun tasks on n1 and n2."""
import os

import pytest

from tests.cluster.slurm import job_info, node_cpus, sbatch

pytestmark = pytest.mark.slurm


def test_two_node_job_runs_a_task_on_each_node(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\necho gpus=${SLURM_GPUS_ON_NODE-unset}/${SLURM_GPUS_PER_NODE-unset}\nsrun bash -c 'echo $SLURMD_NODENAME $SLURM_PROCID'\n")
    job = sbatch(["-N", "2", "--gpus-per-node=0", f"--cpus-per-task={node_cpus()}", "--output=%j.out", script],
                 cwd=tmp_path, env=dict(os.environ), wait=True, timeout=120)
    info = job_info(job)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", info
    first, *tasks = (tmp_path / f"{job}.out").read_text().splitlines()
    # no GPU in the allocation: SLURM_GPUS_ON_NODE unset (or 0), SLURM_GPUS_PER_NODE=0 (pretrain.sh: 1 rank per node)
    assert first in ("gpus=unset/0", "gpus=0/0"), first
    assert sorted(tasks) == ["n1 0", "n2 1"]
