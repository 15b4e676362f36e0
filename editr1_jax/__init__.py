"""Edit-R1 (UniWorld-V2) in JAX: RL post-training of instruction-based image editors."""
