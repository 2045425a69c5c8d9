"""Language-model backends for Darumeru: the abstract interface (base) and transformers (hf)."""
