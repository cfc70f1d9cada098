"""Inference: the latent KV cache (contiguous and paged), sampling, the serving engine with
continuous batching and MTP speculative decoding (engine.py), and the simple sampler (generate.py)."""
