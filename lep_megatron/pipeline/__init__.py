"""`lep-megatron pipeline`: every LEP stage from one config, in one run directory."""
