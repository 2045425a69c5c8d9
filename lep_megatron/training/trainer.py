"""The frozen-body trainer on megatron-core: only the embeddings and LM head learn.

megatron-core does the work: parallel_state groups, GPTModel, its DDP (grad buffers exist only
for trainable parameters, because they are frozen before the wrap), get_megatron_optimizer (AdamW
as the paper: betas 0.9/0.95, eps 1e-5, wd 0.1), OptimizerParamScheduler (cosine with warm-up)
and its forward/backward schedules (pipeline parallel included).
"""
import contextlib
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from lep_megatron.checkpoint.megatron_io import (HF_SUBDIR, CheckpointMeta, load_model, load_sharded, save_model,
                                                split_by_source)
from lep_megatron.common.io import UserInputError
from lep_megatron.compat import optimizer_resume
from lep_megatron.models import build_stage_model
from lep_megatron.models.lora import LoRAConfig, adapted_layers, add_lora
from lep_megatron.models.hf_config import parse_dtype
from lep_megatron.parallel import init_distributed
from lep_megatron.training.flops import step_flops
from lep_megatron.training.freeze import POLICIES, apply_freeze, lora_config
from lep_megatron.training.plan import RECOMPUTE_SETTINGS
from lep_megatron.training.preemption import ResumableExit, StopWatch

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Continued pre-training of the embeddings and LM head (the paper's defaults)."""

    checkpoint: str
    """Megatron checkpoint to start from (`lep-megatron convert hf-to-mcore` or `init`)."""
    out_dir: str
    """Run directory: metrics.jsonl (and checkpoints)."""
    steps: int = 30000
    """Optimizer steps."""
    seq_length: int = 1024
    """Tokens per sample."""
    micro_batch_size: int = 1
    """Samples per micro-batch per data-parallel rank."""
    global_batch_size: int = 256
    """Samples per optimizer step over all data-parallel ranks (gradient accumulation fills it)."""
    lr: float = 2e-4
    """Peak learning rate (the paper: 2e-4 Llama-3, 1e-4 Mistral)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-5
    clip_grad: float = 1.0
    """Gradient clipping by global norm."""
    trainable: str = "embeddings_only"
    """Trainable-parameter policy (lep_megatron.training.freeze): embeddings_only | full |
    calibration (LoRA on the first and last layers + embeddings and head) | sft (LoRA on every
    layer + head)."""
    lora_rank: Optional[int] = None
    """LoRA rank of calibration / sft; None: the policy's (8 calibration, 32 sft)."""
    lora_alpha: Optional[float] = None
    """LoRA alpha (updates scaled by alpha / rank); None: the policy's (1 calibration, 16 sft)."""
    lora_layers: Optional[List[int]] = None
    """Layers that get adapters (global, 0-based, negative from the end); None: the policy's
    (calibration [0, -1], sft every layer)."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input."""
    tp: int = 1
    """Tensor parallel size."""
    pp: int = 1
    """Pipeline parallel size."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks."""
    dtype: str = "float32"
    """Parameter dtype (bfloat16 on GPUs; float32 on CPUs)."""
    seed: int = 1234
    """Seed of megatron's RNG trackers and torch."""
    log_every: int = 1
    """Print a progress line every N steps."""
    save_every: int = 0
    """Checkpoint every N steps (0: only after the last step); out_dir/checkpoints/step_NNNNNNN."""
    save_interval_minutes: float = 30.0
    """Also checkpoint once this many minutes passed since the last save (0: off), so that a
    crash or a kill loses at most this much work whatever the step time."""
    exit_duration_minutes: float = 0.0
    """Save and exit (code 75: launch/pretrain.sh requeues) once this many minutes passed since
    the process started; set it a little below the job's --time so that a run never depends on
    the signal alone. 0: no budget."""
    keep_last: int = 3
    """Keep the newest N checkpoints of out_dir/checkpoints and delete older ones once a newer one
    is complete (0: keep every checkpoint)."""
    save_frozen_weights: bool = False
    """Also write the frozen parameters into every checkpoint (self-contained, as big as the
    model); false: a checkpoint holds the trainable tensors, their optimizer state, scheduler,
    RNG and step, and names train.checkpoint as its base for the frozen ones."""
    async_save: bool = False
    """Write checkpoints from a background process (megatron's async save): training goes on
    while the shards are written, `latest` moves once every rank has finished. Costs a host-memory
    copy of what is saved while it is written."""
    exit_after: int = 0
    """Stop after this step, once its checkpoint is saved (time-limited jobs); 0: run all steps."""
    resume: bool = True
    """Continue from out_dir/checkpoints/latest when it exists."""
    spike_factor: float = 3.0
    """Skip a step whose loss is not finite or exceeds this many times the mean of the last
    steps (a loss spike); 0 disables the spike test (non-finite losses are always skipped)."""
    max_skipped_steps: int = 5
    """Stop with an error after this many skipped steps in a row."""
    eval_every: int = 0
    """Validation loss every N steps (0: never)."""
    eval_batches: int = 1
    """Global batches of the validation set per evaluation."""
    tensorboard: bool = True
    """Also write the metrics as TensorBoard event files (out_dir/tensorboard, rank 0)."""
    peak_tflops_per_device: Optional[float] = None
    """Peak dense TFLOP/s of one device in the training dtype (e.g. 989 for an H100 in bf16);
    when set, the progress line shows MFU from the frozen-body FLOP count."""
    overlap_grad_reduce: bool = True
    """Reduce(-scatter) gradients bucket by bucket during the backward pass (megatron DDP's
    overlap_grad_reduce) instead of all at once after it."""
    overlap_param_gather: bool = True
    """With the distributed optimizer: all-gather the updated parameters bucket by bucket during
    the next forward pass instead of right after the optimizer step (forward pre-hooks; they are
    synchronised before evaluations, hooks and checkpoint saves, as Megatron-LM does)."""
    grad_reduce_dtype: str = "float32"
    """Dtype the data-parallel gradient reduction runs in: float32 (megatron's
    grad_reduce_in_fp32), or the training dtype (bfloat16 with train.dtype=bfloat16: half the bytes
    on the wire, as Megatron-LM's Llama-3 recipes)."""
    recompute: str = "none"
    """Activation recomputation: none | selective (megatron's core_attn: attention scores
    recomputed in backward) | full (every layer keeps only its input and reruns in backward)."""

    def __post_init__(self):
        if self.trainable not in POLICIES:
            raise UserInputError(f"train.trainable={self.trainable!r}: choose one of {sorted(POLICIES)}")
        lora_set = self.lora_rank is not None or self.lora_alpha is not None or self.lora_layers is not None
        if self.lora() is None and (lora_set or self.lora_dropout):
            raise UserInputError(f"train.lora_* are set but train.trainable={self.trainable} has no LoRA adapters; "
                                 "use trainable=calibration or sft")
        if self.steps < 1 or self.seq_length < 2 or self.micro_batch_size < 1:
            raise UserInputError("train.steps, train.micro_batch_size must be >= 1 and train.seq_length >= 2")
        if not 0 <= self.warmup_steps < self.steps:  # megatron's scheduler decays over the steps after warm-up
            raise UserInputError(f"train.warmup_steps={self.warmup_steps} must lie in [0, train.steps={self.steps})")
        parse_dtype(self.dtype, "train.dtype")
        if self.recompute not in RECOMPUTE_SETTINGS:
            raise UserInputError(f"train.recompute={self.recompute!r}: choose one of {list(RECOMPUTE_SETTINGS)}")
        if self.grad_reduce_dtype not in ("float32", self.dtype):
            raise UserInputError(f"train.grad_reduce_dtype={self.grad_reduce_dtype!r}: choose float32 or the training "
                                 f"dtype train.dtype={self.dtype}")
        for key in ("save_interval_minutes", "exit_duration_minutes", "keep_last"):
            if getattr(self, key) < 0:
                raise UserInputError(f"train.{key}={getattr(self, key)} must be >= 0 (0 turns it off)")

    def lora(self) -> Optional[LoRAConfig]:
        """The adapters the trainable policy inserts (None: none)."""
        return lora_config(self.trainable, self.lora_rank, self.lora_alpha, self.lora_layers, self.lora_dropout,
                           self.seed)


def num_microbatches(cfg: TrainConfig) -> int:
    dp = parallel_state.get_data_parallel_world_size()
    per_step = cfg.micro_batch_size * dp
    if cfg.global_batch_size % per_step:
        raise UserInputError(f"train.global_batch_size={cfg.global_batch_size} is not a multiple of "
                             f"micro_batch_size x data-parallel size = {per_step}")
    return cfg.global_batch_size // per_step


def build(cfg: TrainConfig):
    """(model wrapped in megatron DDP, optimizer, scheduler, checkpoint meta) on every rank."""
    init_distributed(cfg.tp, cfg.pp, cfg.seed)
    meta = CheckpointMeta.read(cfg.checkpoint)
    meta.check_tp(cfg.tp)
    dtype = parse_dtype(cfg.dtype)
    if dtype != torch.float32 and not cfg.use_distributed_optimizer:
        # megatron's Float16OptimizerWithFloat16Params wraps only CUDA tensors, and on megatron-core
        # 0.19.2 its checkpoints fail ("Param id .. does not match any model sharded param", seen on
        # an H200 with trainable=full); the distributed optimizer keeps the same fp32 master state
        raise UserInputError(f"train.dtype={cfg.dtype} needs train.use_distributed_optimizer=true (the default; "
                             "at one data-parallel rank it shards nothing): megatron's non-distributed "
                             "mixed-precision optimizer needs CUDA tensors and fails to checkpoint on "
                             "megatron-core 0.19; or use train.dtype=float32")
    lora = cfg.lora()
    # LoRA wraps megatron's own parallel linears: a LoRA run builds the local spec even where
    # TransformerEngine is installed (its dist checkpoints map onto the TE spec's keys and back)
    model = build_stage_model(meta.shape, meta.padded_vocab_size, dtype, use_te=False if lora else None,
                              **RECOMPUTE_SETTINGS[cfg.recompute])
    if meta.lora:
        raise UserInputError(f"checkpoint={cfg.checkpoint} holds LoRA adapters; export it merged "
                             "(`lep-megatron convert mcore-to-hf`, then hf-to-mcore) to train on from it")
    load_model(model, cfg.checkpoint)
    if lora is not None:
        # after the base weights are loaded, before freezing and the DDP wrap; the run's
        # checkpoints record the adapters so that export can merge them
        add_lora(model, lora)
        meta = replace(meta, lora=asdict(lora))
    apply_freeze(model, cfg.trainable)
    # losses are summed per micro-batch and divided by the global count of loss tokens
    # (finalize_model_grads), so loss-masked batches weigh every counted token equally
    model.config.calculate_per_token_loss = True
    overlap_gather = cfg.overlap_param_gather and cfg.use_distributed_optimizer
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=cfg.grad_reduce_dtype == "float32",
                                               use_distributed_optimizer=cfg.use_distributed_optimizer,
                                               overlap_grad_reduce=cfg.overlap_grad_reduce,
                                               overlap_param_gather=overlap_gather)
    model = DistributedDataParallel(model.config, ddp_config, model)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer, overlap_param_gather=overlap_gather,
    )
    optimizer_resume.apply()
    optimizer = get_megatron_optimizer(opt_config, [model])
    # the schedules call these: data-parallel grad reduction (and tied-embedding grads across
    # pipeline stages) happens in finalize_model_grads, loss scaling in grad_scale_func
    model.config.no_sync_func = model.no_sync
    if cfg.overlap_grad_reduce:  # pipeline schedules start each stage's reduction when its backward is done
        model.config.grad_sync_func = model.start_grad_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = optimizer.scale_loss
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=cfg.steps, lr_decay_style="cosine", start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.steps, wd_incr_style="constant",
    )
    return model, optimizer, scheduler, meta


def _forward_step(seq_length: int):
    """Megatron's forward_step over micro-batches that are token tensors [mbs, seq_length + 1]
    (every label counts) or dicts {"tokens": that, "loss_mask": [mbs, seq_length]} (1 where the
    label, tokens[:, 1:], counts: e.g. assistant tokens of a chat)."""
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        tokens = (batch["tokens"] if isinstance(batch, dict) else batch).to(device)
        ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        mask = batch["loss_mask"].to(device).float() if isinstance(batch, dict) else torch.ones_like(labels, dtype=torch.float)
        b = ids.shape[0]
        position_ids = torch.arange(seq_length, device=device).expand(b, seq_length)
        per_token = model(ids, position_ids, None, labels=labels)

        def loss_func(output):
            # (sum, count): with calculate_per_token_loss the schedule keeps the sum and
            # finalize_model_grads divides the gradients by the count over all micro-batches and
            # data-parallel ranks: the mean over the global batch's counted tokens
            loss_sum = (output.float() * mask).sum()
            count = mask.sum().to(torch.int)
            return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), count.detach().float()])}

        return per_token, loss_func

    return forward_step


def evaluate(model, cfg: TrainConfig, valid_batches: Callable[[int], Iterator[torch.Tensor]]) -> float:
    """Mean loss over cfg.eval_batches global batches of the validation set (no grad)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(1, cfg.eval_batches + 1):
            reduced = get_forward_backward_func()(
                forward_step_func=_forward_step(cfg.seq_length), data_iterator=valid_batches(i), model=[model],
                num_microbatches=num_microbatches(cfg), seq_length=cfg.seq_length,
                micro_batch_size=cfg.micro_batch_size, forward_only=True,
            )
            total += _mean_loss(reduced)
    model.train()
    return total / cfg.eval_batches


# the distributed optimizer's state layout in checkpoints that reshard over data-parallel sizes
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
LATEST = "latest"


def checkpoint_dir(cfg: TrainConfig, step: int) -> Path:
    return Path(cfg.out_dir) / "checkpoints" / f"step_{step:07d}"


def save_checkpoint(cfg: TrainConfig, step: int, model, optimizer, scheduler, meta: CheckpointMeta,
                    async_queue=None) -> Path:
    """Model (the trainable tensors, or all with train.save_frozen_weights), optimizer and
    scheduler at `step`, written aside and renamed; then `latest` moves and checkpoints beyond
    train.keep_last are deleted. With `async_queue` the writing goes on in the background and
    the rest happens when the queue finalizes it."""
    out = checkpoint_dir(cfg, step)
    everything_trains = all(p.requires_grad for p in model.module.parameters())
    base = None if cfg.save_frozen_weights or everything_trains else cfg.checkpoint

    def trainer_state(model_state):
        return {"optimizer": optimizer.sharded_state_dict(model_state, is_loading=False, metadata=OPTIMIZER_METADATA),
                "scheduler": scheduler.state_dict(), "step": step,
                "rng": _rng_object(rng_state()), "rng_world_size": dist.get_world_size()}

    def publish():  # collectively, once the checkpoint is complete on every rank
        if dist.get_rank() == 0:
            pointer = out.parent / LATEST
            tmp = pointer.with_suffix(".tmp")
            tmp.write_text(out.name + "\n")
            os.replace(tmp, pointer)
            if cfg.keep_last:
                prune_checkpoints(out.parent, step, cfg.keep_last)
        dist.barrier()

    if async_queue is not None:  # one save in flight at a time: its host copy of the tensors is freed first
        async_queue.maybe_finalize_async_calls(blocking=True)
    save_model(model.module, out, meta, hf_side_dir=Path(cfg.checkpoint) / HF_SUBDIR, overwrite=True,
               extra_state=trainer_state, base_checkpoint=base, async_queue=async_queue, then=[publish])
    if async_queue is None:
        publish()
    return out


def prune_checkpoints(checkpoints: Path, latest_step: int, keep_last: int) -> None:
    """Delete complete checkpoints older than the newest `keep_last` and half-written ones of
    steps up to `latest_step` (rank 0, once `latest` names a complete newer one)."""
    complete = sorted(p for p in checkpoints.glob("step_???????") if p.is_dir())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in checkpoints.glob("step_???????.partial"):
        if int(partial.name[5:12]) <= latest_step:
            shutil.rmtree(partial, ignore_errors=True)


def resume_step(cfg: TrainConfig, model, optimizer, scheduler) -> int:
    """Load the latest checkpoint of out_dir, if any; the last step it completed (0 if none)."""
    pointer = Path(cfg.out_dir) / "checkpoints" / LATEST
    if not (cfg.resume and pointer.is_file()):
        return 0
    ckpt = pointer.parent / pointer.read_text().strip()
    if cfg.use_distributed_optimizer:
        optimizer_resume.initialise_state(model, optimizer)
    model_state = model.module.sharded_state_dict()
    # a trainable-only checkpoint: the frozen tensors were loaded from its base in build()
    held = split_by_source(model_state, ckpt)[0]
    request = {"model": held[1] if held[0] == ckpt else {},
               "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True, metadata=OPTIMIZER_METADATA)}
    # RNG states are per rank: they continue only on as many ranks as wrote them
    same_ranks = dist_checkpointing.load_common_state_dict(str(ckpt)).get("rng_world_size") == dist.get_world_size()
    if same_ranks:
        request["rng"] = _rng_object(None)
    state = load_sharded(request, ckpt)
    model.module.load_state_dict(state["model"], strict=len(request["model"]) == len(model_state))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if same_ranks:
        set_rng_state(state["rng"])
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        rng = "" if same_ranks else f"; RNG states not restored (the checkpoint has none for {world} ranks)"
        print(f"resumed from {ckpt} (step {state['step']}){rng}", flush=True)
    return int(state["step"])


def rng_state() -> dict:
    """Every random generator a step may draw from, on this rank."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "megatron_tracker": get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def _rng_object(state: Optional[dict]) -> ShardedObject:
    """One object per global rank (each rank's generators differ: data-parallel seeds, draws)."""
    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


class StepHook(Protocol):
    """Work run inside training every `every` steps (and after the last one) on every rank,
    e.g. train-time evaluation; its metrics join the step's record in metrics.jsonl."""

    every: int

    def __call__(self, step: int, model) -> Dict[str, float]:
        """Metrics of `model` (the DDP-wrapped megatron model, in eval mode) at `step`."""


def train(cfg: TrainConfig, batches: Callable[[int], Iterator[torch.Tensor]],
          valid_batches: Optional[Callable[[int], Iterator[torch.Tensor]]] = None,
          hooks: Sequence[StepHook] = ()):
    """Run cfg.steps optimizer steps; `batches(step)` yields this data-parallel rank's
    micro-batches [micro_batch_size, seq_length + 1] for that step, `valid_batches(i)` those of
    validation batch i; `hooks` run every hook.every steps. Returns (the global-batch loss of
    every step, known on every rank; the trained DDP-wrapped model)."""
    model, optimizer, scheduler, meta = build(cfg)
    n_micro = num_microbatches(cfg)
    out_dir = Path(cfg.out_dir)
    tensorboard = None
    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
    losses = []
    first_step = resume_step(cfg, model, optimizer, scheduler) + 1
    guard = LossGuard(cfg.spike_factor, cfg.max_skipped_steps)
    tokens_per_step = cfg.global_batch_size * cfg.seq_length
    lora = cfg.lora()
    flops_per_step = step_flops(
        meta.shape, cfg.seq_length, body_trainable=cfg.trainable == "full",
        lora_rank=lora.rank if lora else 0,
        lora_layers=len(adapted_layers(lora, meta.shape.num_layers)) if lora else 0).per_token * tokens_per_step
    # signals and the wall-clock budget stop training at a checkpoint (ResumableExit: exit code 75)
    saves = AsyncCallsQueue() if cfg.async_save else None
    comm = communication_bytes(model)
    with StopWatch(cfg.exit_duration_minutes, cfg.save_interval_minutes) as watch:
        try:
            for step in range(first_step, cfg.steps + 1):
                if saves is not None:  # publish a background save that has finished
                    saves.maybe_finalize_async_calls(blocking=False)
                record = _train_step(cfg, step, model, optimizer, scheduler, batches, n_micro, guard, losses,
                                     tokens_per_step, flops_per_step)
                with parameters_gathered(model):
                    record.update(_evaluations(cfg, step, model, valid_batches, hooks))
                if dist.get_rank() == 0:
                    _log_step(cfg, dict(record, **comm), out_dir, tensorboard)
                decision = watch.decide()
                stopping = step == cfg.exit_after or decision.stop is not None
                if (step == cfg.steps or stopping or decision.save
                        or (cfg.save_every and step % cfg.save_every == 0)):
                    with parameters_gathered(model):
                        save_checkpoint(cfg, step, model, optimizer, scheduler, meta, saves)
                    watch.saved()
                if decision.stop is not None:
                    _finish_saves(saves)
                    stop = ResumableExit(step, decision.stop)
                    if dist.get_rank() == 0:
                        print(f"{stop}: run the same command again (a SLURM job requeues itself)", flush=True)
                    raise stop
                if stopping:
                    break
            _finish_saves(saves)
        finally:
            if tensorboard is not None:
                tensorboard.close()
    if getattr(model, "use_forward_hook", False):  # the caller gets the updated parameters
        model.disable_forward_pre_hook(param_sync=True)
    return losses, model


@contextlib.contextmanager
def parameters_gathered(model):
    """Work outside a training step (evaluation, hooks, saves) with the overlapped parameter
    all-gather finished and its forward pre-hooks off, as Megatron-LM does; on again after."""
    if not getattr(model, "use_forward_hook", False):
        yield
        return
    model.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        model.enable_forward_pre_hook()


def communication_bytes(model) -> Dict[str, int]:
    """Bytes this rank hands to the data-parallel collectives each step: its gradient buffers
    (all-reduced, or reduce-scattered with the distributed optimizer) and, with the distributed
    optimizer, its parameter buffers (all-gathered after the update). 0 on one rank."""
    if parallel_state.get_data_parallel_world_size() == 1:
        return {"grad_reduce_bytes": 0, "param_gather_bytes": 0}
    buffers = list(model.buffers) + list(getattr(model, "expert_parallel_buffers", []))
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
    distributed = model.ddp_config.use_distributed_optimizer
    params = sum(b.param_data.numel() * b.param_data.element_size() for b in buffers if b.param_data is not None)
    return {"grad_reduce_bytes": grads, "param_gather_bytes": params if distributed else 0}


def _finish_saves(saves) -> None:
    """Wait for the background saves (collectively) and publish them."""
    if saves is not None:
        saves.maybe_finalize_async_calls(blocking=True)
        saves.close()


def _train_step(cfg: TrainConfig, step: int, model, optimizer, scheduler, batches, n_micro: int, guard, losses: list,
                tokens_per_step: int, flops_per_step: float) -> dict:
    """One optimizer step (or a skipped one); its metrics record (filled on rank 0)."""
    start = time.perf_counter()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    reduced = get_forward_backward_func()(
        forward_step_func=_forward_step(cfg.seq_length), data_iterator=batches(step), model=[model],
        num_microbatches=n_micro, seq_length=cfg.seq_length, micro_batch_size=cfg.micro_batch_size,
        forward_only=False,
    )
    lr = optimizer.param_groups[0]["lr"]
    loss = _mean_loss(reduced)
    losses.append(loss)
    if guard.skip(loss):
        grad_norm = None  # the gradients of this batch are dropped; the schedule does not advance
    else:
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
    elapsed = time.perf_counter() - start
    if dist.get_rank() != 0:
        return {}
    tflops = flops_per_step / elapsed / dist.get_world_size() / 1e12
    record = {"step": step, "loss": loss, "lr": lr, "skipped": guard.skipped_in_a_row > 0,
              "grad_norm": float(grad_norm) if grad_norm is not None else None,
              "tokens_per_s": tokens_per_step / elapsed, "step_s": elapsed,
              "tflops_per_device": tflops, "peak_memory_gib": peak_memory_gib()}
    if cfg.peak_tflops_per_device:
        record["mfu"] = tflops / cfg.peak_tflops_per_device
    return record


def _evaluations(cfg: TrainConfig, step: int, model, valid_batches, hooks: Sequence[StepHook]) -> dict:
    """The validation loss and the hooks' metrics due at `step` (known on rank 0)."""
    metrics = {}
    if valid_batches is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
        metrics["valid_loss"] = evaluate(model, cfg, valid_batches)
        if dist.get_rank() == 0:
            print(f"step {step}/{cfg.steps} validation loss {metrics['valid_loss']:.4f}", flush=True)
    for hook in hooks:
        if hook.every and (step % hook.every == 0 or step == cfg.steps):
            model.eval()
            with torch.no_grad():
                metrics.update(hook(step, model))
            model.train()
    return metrics


def _log_step(cfg: TrainConfig, record: dict, out_dir: Path, tensorboard) -> None:
    """Rank 0: metrics.jsonl, TensorBoard, the progress line."""
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if tensorboard is not None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):  # bools as 0/1; None (skipped) left out
                tensorboard.add_scalar(key, value, record["step"])
        tensorboard.flush()
    step = record["step"]
    if step % cfg.log_every == 0 or step == cfg.steps:
        mfu = f" MFU {record['mfu']:.1%}" if "mfu" in record else ""
        print(f"step {step}/{cfg.steps} loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} "
              f"tok/s {record['tflops_per_device']:.3g} TFLOP/s/device{mfu} mem {record['peak_memory_gib']:.2f} GiB",
              flush=True)


class LossGuard:
    """Decides whether a step's update is skipped: a non-finite loss, or a spike above
    `spike_factor` x the mean of the last `window` accepted losses; raises after
    `max_skipped` skips in a row."""

    def __init__(self, spike_factor: float, max_skipped: int, window: int = 20):
        self.spike_factor, self.max_skipped, self.window = spike_factor, max_skipped, window
        self.recent = []
        self.skipped_in_a_row = 0

    def skip(self, loss: float) -> bool:
        mean = sum(self.recent) / len(self.recent) if self.recent else None
        spike = bool(self.spike_factor and mean is not None and loss > self.spike_factor * mean)
        if math.isfinite(loss) and not spike:
            self.recent = (self.recent + [loss])[-self.window:]
            self.skipped_in_a_row = 0
            return False
        self.skipped_in_a_row += 1
        if dist.get_rank() == 0:
            print(f"skipping the update: loss {loss} ({'spike' if spike else 'not finite'}), "
                  f"{self.skipped_in_a_row} in a row", flush=True)
        if self.skipped_in_a_row >= self.max_skipped:
            raise RuntimeError(f"{self.skipped_in_a_row} steps in a row had a non-finite or spiking loss "
                               "(train.max_skipped_steps); lower train.lr or check the data")
        return True


def peak_memory_gib() -> float:
    """Peak device memory on a GPU, peak resident memory of the process on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _mean_loss(reduced) -> float:
    """The step's loss over the global batch: the sum of the counted tokens' losses over the
    count, both summed over the micro-batches of the last pipeline stage and the data-parallel
    ranks, shared with every rank."""
    value = torch.zeros(2, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    if parallel_state.is_pipeline_last_stage() and reduced:
        value += sum(r["lm loss"].double().cpu() for r in reduced).to(value.device)
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
    dist.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
    return float(value[0] / value[1])
