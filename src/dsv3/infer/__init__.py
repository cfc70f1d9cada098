"""Inference: the latent KV cache, generation and (later) the serving engine."""
