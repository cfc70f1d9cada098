"""Plain autoregressive sampling over the latent cache: prefill the prompt through the naive
MLA path, then decode one token at a time through the absorbed path, one batch of equal-length
prompts over a contiguous `LatentCache`. The serving engine (engine.py: paged cache, continuous
batching, per-request sampling, speculative decoding) makes the same model calls."""

from __future__ import annotations

import torch

from dsv3.infer.cache import LatentCache
from dsv3.infer.sampling import sample_next


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """prompt_ids [B, T] (same length per row) -> [B, T + n] with n <= max_new_tokens; rows that
    produced eos_token_id are padded with it until all rows stop."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [batch, length>0], got shape {tuple(prompt_ids.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    B, T = prompt_ids.shape
    total = T + max_new_tokens
    if total > model.cfg.max_position_embeddings:
        raise ValueError(
            f"prompt + max_new_tokens = {total} exceeds max_position_embeddings={model.cfg.max_position_embeddings}"
        )
    device = prompt_ids.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    param = next(model.parameters())
    cache = LatentCache(model.cfg, B, total, dtype=param.dtype, device=device)
    was_training = model.training
    model.eval()
    out, done = prompt_ids, torch.zeros(B, dtype=torch.bool, device=device)
    logits = model(prompt_ids, cache=cache, start_pos=0).logits[:, -1]
    for pos in range(T, total):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = nxt.masked_fill(done, eos_token_id)
            done |= nxt == eos_token_id
        out = torch.cat((out, nxt[:, None]), dim=1)
        if bool(done.all()) or pos == total - 1:
            break
        logits = model(nxt[:, None], cache=cache, start_pos=pos).logits[:, -1]
    model.train(was_training)
    return out
