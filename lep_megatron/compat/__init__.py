"""The one place where megatron-core is adapted to its environment.

- cpu.py: fallbacks for machines without CUDA (laptops, CI), applied only when CUDA is absent.
"""
