"""CPU fallbacks for megatron-core, applied only when CUDA is absent.

megatron-core allocates on `torch.cuda.current_device()` / `device="cuda"` and calls
`torch.cuda.synchronize()` unconditionally in a few modules. Instead of patching functions one
by one, those modules see a `torch` in which "cuda" means the CPU (`TorchOnCpu`); nothing
changes for any other module, and nothing at all changes on a machine with CUDA.
"""
import functools
import importlib
import logging
import sys

import torch

log = logging.getLogger(__name__)

# module -> why it needs the CPU view of torch
PATCHED_MODULES = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding":
        "RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device()",
    "megatron.core.transformer.utils":
        "get_default_causal_mask builds the mask with device='cuda'",
    "megatron.core.tensor_parallel.mappings":
        "gather/scatter buffers are allocated on torch.cuda.current_device()",
    "megatron.core.distributed.param_and_grad_buffer":
        "grad buffers are allocated on torch.cuda.current_device()",
    "megatron.core.optimizer.optimizer":
        "found-inf flags and loss scales are created with device='cuda'",
    "megatron.core.optimizer.clip_grads":
        "norm and overflow buffers are created with device='cuda'",
    "megatron.core.optimizer.distrib_optimizer":
        "shard buffers are allocated on torch.cuda.current_device()",
    "megatron.core.optimizer.grad_scaler":
        "loss-scale tensors are created with device='cuda'",
    "megatron.core.utils":
        "GlobalMemoryBuffer.get_tensor allocates on the current CUDA device",
    "megatron.core.pipeline_parallel.p2p_communication":
        "receive buffers on the CUDA device and torch.cuda.synchronize()",
    "megatron.core.pipeline_parallel.schedules":
        "schedules create device='cuda' tensors (token counts, losses)",
    "megatron.core.dist_checkpointing.strategies.filesystem_async":
        "the torch_dist writer calls torch.cuda.synchronize() before preloading tensors",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver":
        "save verification all-reduces flags created on the CUDA device",
    "megatron.core.dist_checkpointing.strategies.async_utils":
        "synchronous saves call torch.cuda.synchronize()",
    "megatron.core.dist_checkpointing.strategies.fully_parallel":
        "the fully-parallel load calls torch.cuda.synchronize() around its exchange",
    "megatron.core.dist_checkpointing.exchange_utils":
        "the fully-parallel load exchanges loaded shards through buffers made with device='cuda'",
}

# "module:Class.method" -> why: methods that call Tensor.cuda(), which a module-level `torch`
# cannot redirect; on the CPU, Tensor.cuda() is the identity while they run
TENSOR_CUDA_METHODS = {
    "megatron.core.models.common.language_module.language_module:LanguageModule.setup_embeddings_and_output_layer":
        "ties the pipeline-split embedding copies with weight.data.cuda()",
    "megatron.core.dist_checkpointing.exchange_utils:exchange_loaded_tensors_broadcast":
        "moves each loaded shard with .cuda() before broadcasting it to the other data-parallel ranks",
    "megatron.core.dist_checkpointing.exchange_utils:exchange_loaded_tensors_gather_rounds":
        "moves each loaded shard with .cuda() before gathering it",
}

# "module:Class.method" -> why: methods called with device="cuda" as an argument; on the CPU
# that argument means the CPU
CUDA_DEVICE_ARGUMENT = {
    "megatron.core.dist_checkpointing.mapping:ShardedTensor.init_data":
        "the fully-parallel load allocates the shards a rank receives with init_data('cuda')",
}

# "module:function" or "module:Class.method" -> why: code that asserts
# `tensor.type() == 'torch.cuda.FloatTensor'`; on the CPU, type() names the CUDA type while it runs
TENSOR_TYPE_AS_CUDA = {
    "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32":
        "asserts every grad is a torch.cuda.FloatTensor",
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__":
        "accepts only torch.cuda.* parameter types for its main parameters",
}

# "module:function" -> why: functions that get or set the CUDA generator's state, which does not
# exist without CUDA; they become _no_cuda_generator
CUDA_RNG_STATE_FUNCTIONS = {
    "megatron.core.tensor_parallel.random:_get_cuda_rng_state":
        "activation recomputation (CheckpointFunction) saves the CUDA RNG state before the forward",
    "megatron.core.tensor_parallel.random:_set_cuda_rng_state":
        "and restores it for the recomputation (torch.cuda._lazy_call would queue every restore, "
        "with its stack trace, for a CUDA initialisation that never comes)",
}

_FACTORIES = ("empty", "empty_like", "zeros", "ones", "full", "tensor", "arange", "randn", "rand", "as_tensor")


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _NullStream:
    """Stands in for a CUDA stream: work on the CPU is already ordered."""

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class CudaOnCpu:
    """`torch.cuda` seen without CUDA: the current device is the CPU, synchronisation is a no-op."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(device=None):
        pass

    @staticmethod
    def current_stream(device=None):
        return _NullStream()

    @staticmethod
    def stream(stream=None):
        return _NullStream()


class TorchOnCpu:
    """`torch` seen without CUDA: tensor factories map device "cuda" to the CPU."""

    cuda = CudaOnCpu()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args, _f=attr, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return _f(*args, **kwargs)
            return factory
        return attr


def _cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is not None:
        return _ORIGINAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)
    name = _ORIGINAL_TENSOR_TYPE(self)
    return name.replace("torch.", "torch.cuda.", 1) if not self.is_cuda else name


_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


def _with_tensor_type_as_cuda(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        torch.Tensor.type = _cuda_type_name
        try:
            return function(*args, **kwargs)
        finally:
            torch.Tensor.type = _ORIGINAL_TENSOR_TYPE

    return wrapper


def _replace_everywhere(module, qualname: str, wrap) -> None:
    """Wrap `module.qualname`; a module-level function is also replaced in the megatron modules
    that imported it by name."""
    if "." in qualname:
        cls_name, method_name = qualname.split(".")
        cls = getattr(module, cls_name)
        setattr(cls, method_name, wrap(getattr(cls, method_name)))
        return
    original = getattr(module, qualname)
    wrapped = wrap(original)
    for name, other in list(sys.modules.items()):
        if name.startswith("megatron.") and getattr(other, qualname, None) is original:
            setattr(other, qualname, wrapped)


def _with_cuda_argument_as_cpu(method):
    @functools.wraps(method)
    def wrapper(self, device, *args, **kwargs):
        return method(self, _cpu_device(device), *args, **kwargs)

    return wrapper


def _no_cuda_generator(*args, **kwargs):
    """Getting or setting the state of a CUDA generator that does not exist: an empty state."""
    return torch.empty(0, dtype=torch.uint8)


def _with_tensor_cuda_as_identity(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    return wrapper


_applied = False


def apply() -> bool:
    """Install the fallbacks once, if CUDA is absent. Returns whether they are active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if not _applied:
        cpu_torch = TorchOnCpu()
        for name, reason in PATCHED_MODULES.items():
            try:
                module = importlib.import_module(name)
            except ImportError:  # not present in this megatron-core version
                continue
            module.torch = cpu_torch
            log.debug("CPU fallback for %s: %s", name, reason)
        for table, wrap in ((TENSOR_CUDA_METHODS, _with_tensor_cuda_as_identity),
                            (TENSOR_TYPE_AS_CUDA, _with_tensor_type_as_cuda),
                            (CUDA_DEVICE_ARGUMENT, _with_cuda_argument_as_cpu),
                            (CUDA_RNG_STATE_FUNCTIONS, lambda original: _no_cuda_generator)):
            for path, reason in table.items():
                module_name, qualname = path.split(":")
                _replace_everywhere(importlib.import_module(module_name), qualname, wrap)
                log.debug("CPU fallback for %s: %s", path, reason)
        _applied = True
    return True
