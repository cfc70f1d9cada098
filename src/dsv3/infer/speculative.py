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

Chained drafts (`Engine(mtp_drafts=k)`, as SGLang and vLLM serve V3's one MTP module with more
speculative steps). The module's output at position i stands in for the main model's hidden
state there: run again on it and the embedding of its own draft d_1, one position on, it drafts
d_2, and so on (V3's training would give depth 2 a module of its own; with one, the module is
reused). A step then verifies [t_n, d_1..d_k] at positions n..n+k and takes the leading run of
accepted drafts, then one more token: the resampled one at the first rejection, or the bonus
after all k. For sampled rows each draft j is accepted with probability min(1, p_j(d_j) /
q_j(d_j)) in order, p_j conditioned on the drafts before it (they are the tokens there once
accepted), which keeps the output distribution that of plain sampling as for one draft. After
the verify, the MTP pass over n..n+k drafts d'_1 from the last accepted position n + a, and each
chained draft writes its latent to the MTP layer's cache one position further (n + a + c, up to
n + 2k - 1 after an all-accepted verify: the engine holds that many positions per step); those
positions are the next step's verify positions or beyond, written over before they are read.

A greedy step needs nothing from outside between the verify and the drafts, so `greedy_step` runs
them in one function, which a compiled engine compiles as one graph: the MTP input at position
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft logits from MTP module 1, and its block's output they came from.

    hidden [B, T, H]: the main model's last hidden states at cache positions start_pos.. (or,
    for a chained draft, T=1: the module's own output at the position before); next_ids [B, T]:
    the tokens that follow each of them; pick [B]: which of the T positions to take the logits
    of (default: the last). Returns (logits [B, V], h [B, 1, H] at the picked positions, before
    shared_head.norm); padded=False: only the draft vocabulary's logits [B, K] (ids 0..K-1), for
    an argmax that need not read the -inf of the others."""
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
    x = module.shared_head.norm(h[:, 0])  # [B, H]
    if module.draft_vocab is None:
        return model.lm_head(x), h
    logits = model.lm_head.first_outputs(x, module.draft_vocab)  # [B, K]: the draft vocabulary, ids 0..K-1
    if not padded:
        return logits, h
    return F.pad(logits, (0, model.lm_head.weight.shape[0] - logits.shape[-1]), value=float("-inf")), h


def restrict_drafts(model, size: int) -> None:
    """Let MTP draft among the `size` lowest token ids only (all of them: the whole head)."""
    model.mtp[0].draft_vocab = None if size >= model.lm_head.out_features else size


def accepted_drafts(matches: torch.Tensor) -> torch.Tensor:
    """matches [B, k] bool (draft j is the token verified at its position) -> [B] how many drafts
    are accepted: the leading run of matches (a draft after a rejected one is never taken)."""
    return matches.long().cumprod(dim=1).sum(dim=1)


def greedy_step(model, fed: torch.Tensor, cache, start_pos) -> tuple[torch.Tensor, ...]:
    """One MTP decode step of greedy rows without a repetition penalty: verify and draft.

    fed [B, 1 + k]: each row's [t_n, d_1..d_k]. Returns (logits [B, 1 + k, V] of the verify,
    its greedy tokens [B, 1 + k] (a row's new tokens are the first accepted + 1), accepted [B],
    the next drafts [B, k]): the tokens of `verify` and of greedy drafting from `mtp_logits`,
    chained as `Engine._draft` chains them (`cache`: the step's CacheView)."""
    out = model(fed, cache=cache, start_pos=start_pos, absorb=True)
    tokens = greedy_tokens(out.logits)  # [B, 1 + k]
    accepted = accepted_drafts(tokens[:, :-1] == fed[:, 1:])  # [B]
    logits, h = mtp_logits(model, out.hidden, tokens, cache, start_pos, True, accepted, padded=False)
    drafts = [greedy_tokens(logits)]
    for c in range(1, fed.shape[1] - 1):  # chained drafts, one position further each
        at = cache.at(accepted + c)
        logits, h = mtp_logits(model, h, drafts[-1][:, None], at, at.start_pos, True, padded=False)
        drafts.append(greedy_tokens(logits))
    return out.logits, tokens, accepted, torch.stack(drafts, dim=1)


def verify(batch: SamplingBatch, logits: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None):
    """Speculative acceptance of k draft tokens per row, in order.

    logits [B, 1 + k, V]: the main model's outputs at [t_n, d_1..d_k]; drafts [B, k]; q [B, k, V]
    the drafts' distributions (one-hot for greedy rows; None if every row is greedy). Returns
    (tokens [B, 1 + k], accepted [B]): a row's new tokens are tokens[b, :accepted[b] + 1], the
    accepted drafts, then a token resampled where the first was rejected (or the bonus token
    after all k). Position j is sampled with d_1..d_j counted as seen (repetition penalty). An
    all-greedy batch takes one argmax per position, the same tokens without the one-hot rows
    and the residuals."""
    k = drafts.shape[1]
    if batch.all_greedy:
        tokens = torch.stack(
            [batch.next_tokens(logits[:, j], also_seen=drafts[:, :j] if j else None) for j in range(k + 1)],
            dim=1,
        )
        return tokens, accepted_drafts(tokens[:, :-1] == drafts)
    rows = torch.arange(drafts.shape[0], device=drafts.device)
    tokens, taken = [], []  # per position: the token, whether its draft was accepted
    for j in range(k):
        d = drafts[:, j]
        p = batch.probs(logits[:, j], also_seen=drafts[:, :j] if j else None)  # [B, V]
        ratio = p[rows, d] / q[rows, j, d]  # q(d) > 0: d was drawn from q
        taken.append(batch.uniform().to(ratio.dtype) < ratio)  # greedy rows draw 0: accept iff p(d) > 0
        residual = (p - q[:, j].to(p.dtype)).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p == q: never rejected
        tokens.append(torch.where(taken[-1], d, sample_from(residual, batch.uniform())))
    tokens.append(batch.sample(batch.probs(logits[:, k], also_seen=drafts)))
    return torch.stack(tokens, dim=1), accepted_drafts(torch.stack(taken, dim=1))
