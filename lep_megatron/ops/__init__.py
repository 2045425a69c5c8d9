"""Python front of the csrc/ kernels: torch.library custom ops with a pure-PyTorch reference."""
from lep_megatron.ops.segment_mean import (
    extension_available,
    segment_mean,
    segment_mean_reference,
    segment_sum,
    segment_sum_reference,
)

__all__ = [
    "extension_available",
    "segment_mean",
    "segment_mean_reference",
    "segment_sum",
    "segment_sum_reference",
]
