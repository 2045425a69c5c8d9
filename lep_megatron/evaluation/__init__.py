"""Darumeru evaluation: 17 tasks on local data, scored through an `LMBackend` (HF now; a
Megatron model implements the same three token-level calls). See README.md in this folder."""
