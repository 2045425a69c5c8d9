"""lep-megatron: Learned Embedding Propagation (LEP) on megatron-core."""

__version__ = "0.1.0"
