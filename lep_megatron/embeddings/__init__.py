"""Embedding initialization of a new vocabulary: averaging (ops.segment_mean), TP-sharded init."""
