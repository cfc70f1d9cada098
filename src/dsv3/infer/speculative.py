"""MTP self-speculative decoding: the model's own multi-token-prediction module drafts the token
after next, and the next forward of the main model verifies it (V3R section 5.4.3: 85-90%
acceptance, 1.8x tokens per second).

State of a sequence between steps: tokens t_0..t_n are known, t_0..t_{n-1} are in the cache, t_n
is pending (sampled, not fed yet), and d is a draft for t_{n+1}. One step:
  1. verify: the main model runs [t_n, d] at positions n, n+1 (two tokens per sequence, one
     batched forward). p_0 = its distribution for t_{n+1}, p_1 for t_{n+2} given d.
  2. accept d with probability min(1, p_0(d) / q(d)) (q = the draft's distribution); on accept
     t_{n+1} = d and a bonus t_{n+2} ~ p_1 (two tokens from one forward); on reject
     t_{n+1} ~ norm(max(0, p_0 - q)) and the cache entry written for d is rolled back (the
     sequence's length simply stays at n + 1; the slot is masked and later overwritten).
     This keeps the output distribution exactly that of plain sampling from p (Leviathan et al.
     2023, Chen et al. 2023). Greedy is the special case of one-hot p and q: accept iff d is the
     argmax, so the output is identical to plain greedy decoding, as the two-token verify gives
     its first row the very logits of a one-token step (also compiled, where the two graphs fuse
     differently: Engine._fast has Inductor round where the model rounds).
  3. draft: MTP module 1 at position i combines the main model's hidden state h_i (before the
     final norm) with the embedding of t_{i+1} and predicts t_{i+2} (mtp.py). It is a full
     Transformer block with its own attention, so it keeps its own latent cache (one more layer
     in the paged cache, same block tables). After the verify it runs on positions n, n+1 with
     inputs (h_n, t_{n+1}) and (h_{n+1}, t_{n+2}) and its output at the last accepted position
     is the next draft. The prefill runs it over the whole prompt the same way. Both positions
     (every prompt position) write their latents to its cache, but only the one drafted from
     goes on past the cache write (Block's `rows`): its queries, attention, FFN and head.
As in training, the MTP block's RoPE position is that of the embedded token (i + 1).

A greedy step needs nothing from outside between the verify and the draft, so `greedy_step` runs
both in one function, which a compiled engine compiles as one graph: the MTP input at position
n is (h_n, t_{n+1}) whether or not d was accepted (accepted means d == t_{n+1}), so both positions
enter the MTP block at once and the accepted one, picked inside the graph, is drafted from. On a
CPU each compiled call has a fixed cost (Dynamo's and AOTAutograd's wrappers, ~50 us) that is a
sixth of a tiny model's whole step; one call per step instead of two saves it.

The draft vocabulary. Decoding one sequence on a CPU is bound by reading the weights, and a
step with MTP reads the vocabulary head twice: the verify's logits, then the draft's, which
depend on the verify. The head is a large share of a small model (tiny: 4 of ~10 MB read per
token in BF16). A draft need not be exact, only likely, so MTP drafts among the K most frequent
tokens only (`restrict_drafts`; FR-Spec, Zhao et al. 2025), reading K rows of the head instead
of V. A BPE tokenizer numbers its tokens in merge order, most frequent first, so those are ids
0..K-1: lm_head's first rows (`Linear.first_outputs`: a view of them, or of the panels holding
them where the head runs on the panel kernel), nothing copied. The verify still reads the whole head,
so the output is the same; only acceptance can change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.infer.sampling import SamplingBatch, greedy_tokens, sample_from


def mtp_logits(
    model,
    hidden: torch.Tensor,
    next_ids: torch.Tensor,
    cache,
    start_pos,
    absorb: bool,
    pick: torch.Tensor | None = None,
    padded: bool = True,
) -> torch.Tensor:
    """Draft logits [B, V] from MTP module 1.

    hidden [B, T, H]: the main model's last hidden states at cache positions start_pos..;
    next_ids [B, T]: the tokens that follow each of them; pick [B]: which of the T positions
    to take the logits of (default: the last). padded=False: only the draft vocabulary's logits
    [B, K] (ids 0..K-1), for an argmax that need not read the -inf of the others."""
    module = model.mtp[0]
    B, T = next_ids.shape
    cos, sin = model.rope(start_pos + 1, T)
    if pick is None:
        pick = torch.full((B,), T - 1, device=next_ids.device)
    h, _ = module(  # [B, 1, H]: all T positions fill the cache, only `pick` runs the block's FFN
        hidden,
        model.embed_tokens(next_ids),
        cos,
        sin,
        cache=cache,
        start_pos=start_pos,
        absorb=absorb,
        rows=pick,
    )
    h = module.shared_head.norm(h[:, 0])  # [B, H]
    if module.draft_vocab is None:
        return model.lm_head(h)
    logits = model.lm_head.first_outputs(h, module.draft_vocab)  # [B, K]: the draft vocabulary, ids 0..K-1
    if not padded:
        return logits
    return F.pad(logits, (0, model.lm_head.weight.shape[0] - logits.shape[-1]), value=float("-inf"))  # [B, V]


def restrict_drafts(model, size: int) -> None:
    """Let MTP draft among the `size` lowest token ids only (all of them: the whole head)."""
    model.mtp[0].draft_vocab = None if size >= model.lm_head.out_features else size


def greedy_step(model, fed: torch.Tensor, cache, start_pos) -> tuple[torch.Tensor, ...]:
    """One MTP decode step of greedy rows without a repetition penalty: verify and draft.

    fed [B, 2]: each row's [t_n, d]. Returns (logits [B, 2, V] of the verify, t_{n+1} [B],
    t_{n+2} [B] (meaningful where accepted), accepted [B] bool, the next draft [B]): the tokens of
    `verify` and of greedy drafting from `mtp_logits`."""
    out = model(fed, cache=cache, start_pos=start_pos, absorb=True)
    best = greedy_tokens(out.logits)  # [B, 2]
    first, bonus = best[:, 0], best[:, 1]
    accepted = first == fed[:, 1]
    next_ids = torch.stack((first, torch.where(accepted, bonus, first)), dim=1)  # [B, 2]
    draft = greedy_tokens(
        mtp_logits(model, out.hidden, next_ids, cache, start_pos, True, accepted.long(), padded=False)
    )
    return out.logits, first, bonus, accepted, draft


def verify(batch: SamplingBatch, logits: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None):
    """Speculative acceptance of one draft token per row.

    logits [B, 2, V]: the main model's outputs at [t_n, d]; draft [B]; q [B, V] the draft's
    distribution (one-hot for greedy rows; None if every row is greedy). Returns (t_{n+1} [B],
    t_{n+2} [B], accepted [B] bool); t_{n+2} is meaningful only where accepted. An all-greedy
    batch takes two argmaxes, the same tokens without the one-hot rows and the residual."""
    if batch.all_greedy:
        first = batch.next_tokens(logits[:, 0])
        return first, batch.next_tokens(logits[:, 1], also_seen=draft), first == draft
    rows = torch.arange(draft.shape[0], device=draft.device)
    p0 = batch.probs(logits[:, 0])  # [B, V]
    ratio = p0[rows, draft] / q[rows, draft]  # q(d) > 0: d was drawn from q
    accepted = batch.uniform().to(ratio.dtype) < ratio  # greedy rows draw 0: accept iff p0(d) > 0
    residual = (p0 - q.to(p0.dtype)).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p0)  # p0 == q: never rejected
    resampled = sample_from(residual, batch.uniform())
    bonus = batch.sample(batch.probs(logits[:, 1], also_seen=draft))
    return torch.where(accepted, draft, resampled), bonus, accepted
