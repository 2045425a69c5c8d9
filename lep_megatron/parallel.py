"""torch.distributed + megatron parallel_state set-up, for torchrun/srun ranks and for one process."""
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from lep_megatron.compat import cpu as cpu_compat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks_from_slurm() -> None:
    """srun with one task per GPU: the ranks are SLURM's (MASTER_ADDR/PORT set by the launcher)."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234) -> None:
    """Join (or, outside any launcher, create a one-rank) process group and build TP/PP/DP groups.

    Ranks come from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) or from srun's
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); NCCL with CUDA, gloo without.
    """
    _ranks_from_slurm()
    on_cpu = cpu_compat.apply()
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:
            init_method = "env://"
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        else:
            init_method, rank, world = f"tcp://127.0.0.1:{_free_port()}", 0, 1
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("gloo" if on_cpu else "nccl", init_method=init_method,
                                rank=rank, world_size=world)
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() == tp
                and parallel_state.get_pipeline_model_parallel_world_size() == pp):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    # without CUDA there is no CUDA RNG to track; the inference tracker makes its forks no-ops
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=on_cpu)
    torch.manual_seed(seed)


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
