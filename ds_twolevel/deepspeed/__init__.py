"""DeepSpeed integration: runtime, ZeRO, checkpoints, faults, config, compat."""
