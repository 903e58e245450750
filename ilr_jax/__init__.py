"""ilr_jax: Iterative Label Refinement and SFT+DPO under weak supervision, in JAX/Flax NNX."""
