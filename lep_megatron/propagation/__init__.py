"""Learned Embedding Propagation: a donor's adapted embeddings carried into an instruct model."""
from lep_megatron.propagation.propagate import MODES, PropagateConfig, propagate
from lep_megatron.propagation.solve import SOLVERS, fit_map

__all__ = ["MODES", "SOLVERS", "PropagateConfig", "fit_map", "propagate"]
