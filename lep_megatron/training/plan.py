"""The parallel planner: model shape + cluster -> TP / PP / DP, micro-batch and activation
recomputation, with a per-GPU memory estimate and the reasoning behind the choice.

With the body frozen only the embeddings and the LM head carry gradients and optimizer state, so
a 7-8B model's weights plus a few GiB fit one 80 GB GPU: pure data parallelism (no TP/PP
communication, no pipeline bubble) is then both the simplest and the fastest layout. The planner
tries layouts in order of model-parallel size (TP before PP at equal size), and for each the
largest micro-batch without recomputation, then with selective, then with full recomputation;
the first that fits is the plan.

The memory model counts what megatron-core keeps alive on the most loaded pipeline stage:
- weights in the parameter dtype (matrices split over TP);
- for trainable parameters only: the DDP grad buffer (fp32: grad_reduce_in_fp32) and the
  optimizer (Adam moments, plus fp32 master weights when the parameters are bf16/fp16), the
  latter split over DP by the distributed optimizer; and the weight gradient of the largest
  trainable table, computed in the parameter dtype before it is added to the fp32 buffer;
- activations saved for backward per micro-batch. Frozen linears (LinearWithFrozenWeight) keep
  only their weight, not their input; what stays are the norm inputs, attention's inputs and
  outputs (flash attention on GPUs; megatron's unfused attention on CPUs also keeps the
  [heads, s, s] probabilities in fp32 and GQA-expanded keys and values) and the SwiGLU inputs.
  The CPU terms were counted with autograd's saved-tensor hooks; the GPU ones (Transformer
  Engine) are the kernels' documented saved tensors, not measured here.
  1F1B pipelining keeps up to pp micro-batches in flight on the first stage;
- the logits [s, b, vocab / tp]: megatron's cross entropy works on an fp32 copy, and backward
  holds its gradient in fp32 plus a copy in the parameter dtype;
- a fixed framework overhead (CUDA context, NCCL and TE workspaces, allocator slack).

`checkpoint_bytes` sizes one saved checkpoint: a full one (every parameter in the training dtype,
plus the optimizer state of the trainable ones) against a trainable-only one (the trainable
tensors and their optimizer state; the frozen body stays in the base checkpoint).
"""
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Sequence

from lep_megatron.common.io import UserInputError
from lep_megatron.models.gpt import padded_vocab_size
from lep_megatron.models.hf_config import HFModelShape, parse_dtype
from lep_megatron.training.freeze import EMBEDDINGS, HEAD, POLICIES

GIB = 2**30
GB = 10**9
# TrainConfig.recompute -> megatron TransformerConfig fields. "selective" recomputes the modules
# of recompute_modules, whose default in megatron-core 0.16 and 0.19 alike is ["core_attn"]: the
# attention scores and probabilities (worth it for unfused attention; flash attention keeps no
# [s, s] tensor anyway). "full" checkpoints every layer ("uniform", one layer per unit).
RECOMPUTE_SETTINGS = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class PlanRequest:
    """What the planner needs to know about the model, the batch and the cluster."""

    shape: HFModelShape
    """The model (the checkpoint's, or that of model=<name>)."""
    num_gpus: int
    """Devices in the job (nodes x GPUs per node)."""
    gpu_memory_gib: float
    """Memory of one device."""
    seq_length: int
    """Tokens per sample."""
    global_batch_size: int
    """Samples per optimizer step."""
    dtype: str = "bfloat16"
    """Parameter dtype."""
    trainable: str = "embeddings_only"
    """Trainable-parameter policy; `full` trains the body, any other is counted as embeddings +
    head (LoRA adapters are small next to them)."""
    gpus_per_node: int = 8
    """TP stays within a node."""
    device: str = "cuda"
    """Kernels the estimate assumes: cuda (Transformer Engine: flash attention, fused SwiGLU) or
    cpu (megatron's local spec: unfused attention)."""
    use_distributed_optimizer: bool = True
    """Optimizer state sharded over DP ranks."""
    make_vocab_size_divisible_by: int = 128
    """Vocabulary padding granularity per TP rank."""
    overhead_gib: float = 5.0
    """Fixed per-device overhead: CUDA context, NCCL buffers, TE workspaces, allocator slack."""
    usable_fraction: float = 0.9
    """Share of gpu_memory_gib a plan may fill (fragmentation, spikes)."""
    max_micro_batch_size: int = 8
    """Largest micro-batch tried (beyond it GEMMs gain little)."""

    def __post_init__(self):
        parse_dtype(self.dtype, "train.dtype")
        if self.device not in DEVICES:
            raise UserInputError(f"device={self.device!r}: choose one of {DEVICES}")
        if self.num_gpus < 1 or self.gpu_memory_gib <= 0:
            raise UserInputError(f"cluster: need >= 1 GPU with memory > 0 (got {self.num_gpus} x "
                                 f"{self.gpu_memory_gib} GiB); set cluster.nodes, cluster.gpus_per_node, "
                                 "cluster.gpu_memory_gib")
        if self.seq_length < 1 or self.global_batch_size < 1:
            raise UserInputError("train.seq_length and train.global_batch_size must be >= 1")

    @property
    def dtype_bytes(self) -> int:
        return parse_dtype(self.dtype).itemsize

    @property
    def body_trainable(self) -> bool:
        return self.trainable == "full"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device on the most loaded pipeline stage, by what holds them."""

    weights: float
    grads: float
    """fp32 DDP grad buffer of the trainable parameters."""
    optimizer: float
    """Adam moments (+ fp32 master weights for bf16/fp16), sharded over DP when distributed."""
    activations: float
    """Saved for backward by the transformer layers, all micro-batches in flight."""
    logits: float
    """[s, b, vocab / tp] in fp32 for the loss, plus its gradient's copy in the parameter dtype."""
    transient: float
    """Weight gradient of the largest trainable table before it joins the grad buffer."""
    overhead: float

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations + self.logits
                + self.transient + self.overhead)

    def lines(self) -> List[str]:
        parts = ("weights", "grads", "optimizer", "activations", "logits", "transient", "overhead")
        return [f"  {p:<12}{getattr(self, p) / GIB:8.2f} GiB" for p in parts] + [
            f"  {'total':<12}{self.total / GIB:8.2f} GiB"]


@dataclass(frozen=True)
class Plan:
    """A layout that fits, the estimate that says so, and how it was found."""

    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    recompute: str
    """none | selective | full (TrainConfig.recompute)."""
    memory: MemoryEstimate
    reasoning: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        head = [f"parallel plan: tp={self.tp} pp={self.pp} dp={self.dp} micro_batch_size={self.micro_batch_size} "
                f"recompute={self.recompute}"]
        return head + [f"  - {r}" for r in self.reasoning] + ["per-device memory estimate:"] + self.memory.lines()


def _layer_params(s: HFModelShape) -> int:
    attention = s.hidden_size * (s.num_attention_heads + 2 * s.query_groups) * s.head_dim
    attention += s.num_attention_heads * s.head_dim * s.hidden_size
    if s.qkv_bias:
        attention += (s.num_attention_heads + 2 * s.query_groups) * s.head_dim
    return attention + 3 * s.hidden_size * s.intermediate_size + 2 * s.hidden_size


def _layer_activation_bytes(req: PlanRequest, tp: int, tokens: int, recompute: str) -> float:
    """Bytes one transformer layer keeps for backward over `tokens` tokens of one micro-batch."""
    s, a = req.shape, req.dtype_bytes
    h, f, hd = s.hidden_size, s.intermediate_size, s.head_dim
    heads, groups = s.num_attention_heads / tp, s.query_groups / tp
    if recompute == "full":
        return tokens * h * a  # only the layer's input; its insides are recomputed in backward
    per_token = 2 * h  # inputs of the two RMSNorms (replicated over TP: no sequence parallelism)
    if req.device == "cuda":
        attention = (heads + 2 * groups) * hd + heads * hd  # flash attention keeps q, k, v and its output
        if recompute == "selective":
            attention = (heads + 2 * groups) * hd
        mlp = 2 * f / tp  # the fused SwiGLU keeps its input only
        probs = 0.0
    else:  # counted with autograd's saved-tensor hooks on megatron's local spec
        # q and k after RoPE, and v: a view that keeps the whole fused q/k/v projection alive
        fused_qkv = (heads + 2 * groups) * hd + heads * hd + groups * hd
        if recompute == "selective":  # the checkpoint keeps q, k, v; scores are recomputed
            attention, probs = fused_qkv, 0.0
        else:  # with GQA, k and v expanded to every head (copies); the [heads, s, s] probabilities in fp32
            attention = 3 * heads * hd if heads > groups else fused_qkv
            probs = heads * req.seq_length * (4 + (a if a != 4 else 0))
        mlp = 4 * f / tp  # the gate/up output, a copy of its up half and silu(gate)
    if req.body_trainable:  # trainable linears keep their inputs for the weight gradient
        per_token += 2 * h + heads * hd + f / tp
    return tokens * ((per_token + attention + mlp) * a + probs)


def estimate_memory(req: PlanRequest, tp: int, pp: int, dp: int, micro_batch_size: int,
                    recompute: str) -> MemoryEstimate:
    """Per-device bytes of the most loaded pipeline stage (the first holds pp micro-batches in
    flight and the embedding; the last the head and the logits)."""
    s, a = req.shape, req.dtype_bytes
    vocab = padded_vocab_size(s.vocab_size, req.make_vocab_size_divisible_by, tp)
    table = vocab * s.hidden_size / tp
    layers = s.num_layers // pp
    body = layers * _layer_params(s) / tp
    tokens = micro_batch_size * req.seq_length
    n_micro = req.global_batch_size // (dp * micro_batch_size)
    layer_act = _layer_activation_bytes(req, tp, tokens, recompute)
    # recomputation rebuilds what it dropped, one layer at a time, during backward
    rebuilt = _layer_activation_bytes(req, tp, tokens, "none") - layer_act
    # megatron's unfused attention keeps one [b * heads, s, s] score buffer for all layers
    score_buffer = tokens * s.num_attention_heads / tp * req.seq_length * a if req.device == "cpu" else 0.0
    master = 4 if a != 4 else 0
    opt_shard = dp if req.use_distributed_optimizer else 1

    def stage(first: bool, last: bool) -> MemoryEstimate:
        # the first stage holds the embedding, the last the head (a copy of it when tied and pp > 1)
        tables = int(first) + int(last and not (first and s.tie_word_embeddings))
        params = body + tables * table + (s.hidden_size if last else 0)
        trainable = params if req.body_trainable else tables * table
        in_flight = min(pp, n_micro) if first else 1
        activations = in_flight * layers * layer_act + rebuilt + score_buffer
        logits = 0.0
        if last:
            activations += 2 * tokens * s.hidden_size * a  # final norm input, head input
            logits = tokens * vocab / tp * (4 + (a if a != 4 else 0))
        return MemoryEstimate(
            weights=params * a, grads=trainable * 4, optimizer=trainable * (8 + master) / opt_shard,
            activations=activations, logits=logits, transient=table * a,
            overhead=req.overhead_gib * GIB)

    stages = [stage(True, pp == 1)] + ([stage(False, True)] if pp > 1 else [])
    return max(stages, key=lambda e: e.total)


class CheckpointBytes(NamedTuple):
    """Bytes of one checkpoint of a run, and the parameter counts behind them."""

    full: int
    """Every parameter in the training dtype + the trainable parameters' optimizer state."""
    trainable_only: int
    """The trainable tensors in the training dtype + the same optimizer state."""
    parameters: int
    """All parameters (the embedding and head tables at the padded vocabulary)."""
    trainable: int
    """Parameters that train (whole tensors of the policy + LoRA adapters)."""
    optimizer_bytes_per_parameter: int
    """Adam exp_avg + exp_avg_sq in fp32 (8), + fp32 master weights (12: the distributed
    optimizer, or a half dtype)."""


def _lora_parameters(s: HFModelShape, rank: int, layers: Optional[Sequence[int]]) -> int:
    """Adapter parameters, rank x (in + out) per adapted linear (qkv, proj, fc1 gate+up, fc2)."""
    if layers is None:
        n_layers = s.num_layers
    else:
        bad = [i for i in layers if not -s.num_layers <= i < s.num_layers]
        if bad:
            raise UserInputError(f"train.lora_layers={list(layers)}: {bad} out of range for {s.num_layers} layers")
        n_layers = len({i % s.num_layers for i in layers})
    q, kv = s.num_attention_heads * s.head_dim, s.query_groups * s.head_dim
    per_layer = ((s.hidden_size + q + 2 * kv) + (q + s.hidden_size)
                 + (s.hidden_size + 2 * s.intermediate_size) + (s.intermediate_size + s.hidden_size))
    return n_layers * rank * per_layer


def checkpoint_bytes(shape: HFModelShape, padded_vocab: int, dtype: str = "bfloat16",
                     trainable: str = "embeddings_only", lora_rank: Optional[int] = None,
                     lora_layers: Optional[Sequence[int]] = None,
                     use_distributed_optimizer: bool = True) -> CheckpointBytes:
    """Size of one checkpoint, full vs trainable-only (scheduler, RNG and data position are a few
    KB, not counted). padded_vocab: the vocabulary as megatron holds it (padded_vocab_size with
    the run's tp). The optimizer state exists for trainable parameters only: fp32 exp_avg and
    exp_avg_sq, plus the fp32 master weights that the distributed optimizer stores whatever the
    dtype (the plain optimizer has none in fp32: its master weights are the parameters). trainable: a train.trainable policy; whole tensors per its prefixes
    (embeddings_only: word embeddings + output layer, one table when tied), plus LoRA adapters of
    lora_rank on lora_layers (None: the policy's defaults) for calibration / sft."""
    if trainable not in POLICIES:
        raise UserInputError(f"train.trainable={trainable!r}: choose one of {sorted(POLICIES)}")
    if padded_vocab < shape.vocab_size:
        raise UserInputError(f"padded_vocab={padded_vocab} is below the model's vocab_size {shape.vocab_size}")
    a = parse_dtype(dtype, "train.dtype").itemsize
    table = padded_vocab * shape.hidden_size
    tables = 1 if shape.tie_word_embeddings else 2
    body = shape.num_layers * _layer_params(shape) + shape.hidden_size  # + the final norm
    policy = POLICIES[trainable]
    if policy.prefixes == ("",):
        whole = body + tables * table
    else:
        named = set(policy.prefixes) & {EMBEDDINGS, HEAD}
        # tied: the head is the embedding table, one tensor that trains when either does
        whole = table * (min(len(named), 1) if shape.tie_word_embeddings else len(named))
    adapters = 0
    if policy.lora_rank is not None:
        rank = policy.lora_rank if lora_rank is None else lora_rank
        if rank < 1:
            raise UserInputError(f"train.lora_rank={rank} must be >= 1")
        adapters = _lora_parameters(shape, rank, policy.lora_layers if lora_layers is None else lora_layers)
    parameters = body + tables * table + adapters
    n_trainable = whole + adapters
    per_param = 8 + (4 if use_distributed_optimizer or a != 4 else 0)
    optimizer = n_trainable * per_param
    return CheckpointBytes(full=parameters * a + optimizer, trainable_only=n_trainable * a + optimizer,
                           parameters=parameters, trainable=n_trainable, optimizer_bytes_per_parameter=per_param)


def checkpoint_lines(size: CheckpointBytes, dtype: str, keep_last: Optional[int],
                     save_frozen_weights: Optional[bool] = None) -> List[str]:
    """The dry run's account of checkpoint storage: per checkpoint, and per run with keep_last
    (0/None: every checkpoint kept). save_frozen_weights (train.save_frozen_weights; None: not
    configured) marks which of the two the run writes."""

    def amount(n: int) -> str:
        return f"{n / GB:.2f} GB ({n / GIB:.2f} GiB)"

    a = parse_dtype(dtype, "train.dtype").itemsize
    state = ("fp32 master + Adam exp_avg, exp_avg_sq" if size.optimizer_bytes_per_parameter == 12
             else "Adam exp_avg, exp_avg_sq in fp32")
    mark = {True: "", False: ""}
    if save_frozen_weights is not None and size.full != size.trainable_only:
        mark[bool(save_frozen_weights)] = f"  <- this run (train.save_frozen_weights={str(bool(save_frozen_weights)).lower()})"
    lines = [
        f"checkpoint size ({dtype}; optimizer state: {state}, {size.optimizer_bytes_per_parameter} bytes per "
        f"trainable parameter):",
        f"  full:           {amount(size.full)}: {size.parameters:,} parameters x {a} bytes + optimizer state of "
        f"{size.trainable:,} trainable{mark[True]}",
        f"  trainable-only: {amount(size.trainable_only)}: {size.trainable:,} trainable parameters x {a} bytes + "
        f"their optimizer state (the frozen body is read from the base checkpoint){mark[False]}",
    ]
    if keep_last:
        lines.append(f"  per run with train.keep_last={keep_last}: full {amount(keep_last * size.full)}, "
                     f"trainable-only {amount(keep_last * size.trainable_only)} "
                     "(one checkpoint more while a save completes, before the oldest is deleted)")
    else:
        lines.append(f"  per run with train.keep_last={keep_last}: every checkpoint is kept; "
                     "the run grows by one checkpoint per save")
    return lines


def _divides(shape: HFModelShape, tp: int) -> bool:
    return all(n % tp == 0 for n in (shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size))


def plan(req: PlanRequest) -> Plan:
    """The first layout that fits, preferring data parallelism."""
    s = req.shape
    budget = req.gpu_memory_gib * req.usable_fraction * GIB
    layouts = []
    for t in (1, 2, 4, 8):
        for p in range(1, s.num_layers + 1):
            if t > req.gpus_per_node or not _divides(s, t) or s.num_layers % p or req.num_gpus % (t * p):
                continue
            dp = req.num_gpus // (t * p)
            if req.global_batch_size % dp == 0:
                layouts.append((t, p, dp))
    layouts.sort(key=lambda l: (l[0] * l[1], l[1]))
    reasoning = [f"{req.num_gpus} x {req.gpu_memory_gib:g} GiB, usable {budget / GIB:.1f} GiB per device; "
                 f"{'body trainable' if req.body_trainable else 'body frozen: only embeddings + head train'}; "
                 "trying layouts from the least model parallelism (pure DP first)"]
    for t, p, dp in layouts:
        per_rank = req.global_batch_size // dp
        sizes = [m for m in (8, 4, 2, 1) if m <= req.max_micro_batch_size and per_rank % m == 0]
        for recompute in RECOMPUTE_SETTINGS:
            for mbs in sizes:
                est = estimate_memory(req, t, p, dp, mbs, recompute)
                if est.total <= budget:
                    reasoning.append(f"tp={t} pp={p} dp={dp}: micro-batch {mbs} with recompute={recompute} "
                                     f"needs {est.total / GIB:.1f} GiB <= {budget / GIB:.1f}: chosen")
                    return Plan(t, p, dp, mbs, recompute, est, reasoning)
        smallest = estimate_memory(req, t, p, dp, 1, "full")
        reasoning.append(f"tp={t} pp={p} dp={dp}: does not fit even at micro-batch 1 with full recomputation "
                         f"({smallest.total / GIB:.1f} GiB > {budget / GIB:.1f})")
    raise UserInputError(
        "no layout fits: " + "; ".join(reasoning[1:] or ["no tp/pp divides the model and the GPU count"])
        + ". Add GPUs (cluster.nodes) or lower train.seq_length")
