"""llama_jax: sharded pretraining of LLaMA-family models with JAX and Flax NNX."""
