"""The DeepSeek-V3 language model: embedding -> blocks -> norm -> head, plus MTP modules.

    out = model(input_ids)                  # out.logits [B, T, vocab]
    out = model(input_ids, labels=labels)   # + out.loss, out.mtp_loss, out.balance_loss

With labels, the head and the cross entropy run fused chunk by chunk (model/loss.py) and the
full logits are not materialized; pass `return_logits=True` to get them as well.

`labels` are pre-shifted targets: labels[:, t] is the token that follows input_ids[:, t];
-100 marks a position without a target (padding, or the first token of the next packed
document). The MTP module of depth k predicts labels[:, t + k] from position t and skips
positions whose chain t..t+k crosses a -100, so MTP never predicts across a document boundary.
`segments` [B, T] (optional) numbers the packed documents of each row: a token then attends only
to earlier tokens of its own document, and RoPE positions restart at each document's first token,
so packed conversations are trained exactly as if each were alone.

The three losses come back separately so the trainer can weigh them:
    total = loss + lambda * mtp_loss + balance_loss    (balance_loss already carries alpha).

A pipeline stage (parallel/pipeline.py) is this model with parts removed, as in torchtitan: the
layers are a ModuleDict keyed by layer index, so a stage keeps the full model's parameter names;
a stage without `embed_tokens` takes the previous stage's activations (h, emb, balance) instead of
token ids, and a stage with a part removed returns those activations instead of logits. The last
stage's loss function finishes the forward with `losses(h, emb, balance, labels)`, the same method
`forward` ends with, so there is one forward to read and keep correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.attention import AttentionCache
from dsv3.model.block import Block
from dsv3.model.linear import Linear
from dsv3.model.loss import IGNORE_INDEX, linear_cross_entropy
from dsv3.model.moe import GroupedExperts, Router
from dsv3.model.mtp import MTPModule
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import rope_cos_sin, rope_inv_freq


@dataclass
class TransformerOutput:
    logits: torch.Tensor | None  # [B, T, V]; None when computing losses unless asked for
    loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # last block's output, before the final norm [B, T, H]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers)
        )
        inv_freq, self.rope_attn_factor = rope_inv_freq(cfg)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.init_weights()

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zero router biases.
        Also the way to materialize a model built on `meta` after `to_empty()`."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.gate_up_proj, 0.0, std, generator=generator)
                nn.init.normal_(module.down_proj, 0.0, std, generator=generator)
            elif isinstance(module, Router):
                module.reset_parameters(std, generator)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.rope_inv_freq.device.type != "meta":
            self.rope_inv_freq.copy_(rope_inv_freq(self.cfg)[0])

    @torch.no_grad()
    def cast_(self, dtype: torch.dtype) -> Transformer:
        """Cast the weights to `dtype` in place, except what stays in FP32 whatever the weights'
        dtype (as in DeepSeek's reference and release): the routers' gate weight and selection
        bias, and the RoPE frequencies; FP8-resident weights (float8 codes and their FP32 block
        scales, dsv3.fp8.resident) keep theirs too. Returns self."""

        def castable(name: str, t: torch.Tensor) -> bool:
            return t.is_floating_point() and t.element_size() > 1 and not name.endswith("_scale_inv")

        for module in self.modules():
            if isinstance(module, Router):
                continue
            for name, p in module.named_parameters(recurse=False):
                if castable(name, p):
                    p.data = p.data.to(dtype)
            for name, b in module.named_buffers(recurse=False):
                if castable(name, b) and name != "rope_inv_freq":
                    setattr(module, name, b.to(dtype))
        return self

    def num_params(self) -> dict[str, int]:
        """Parameter counts from the modules (works on `meta`), counting what the checkpoint
        stores (parameters and the routers' bias buffers): the main model's total, those
        activated per token (all but the unchosen routed experts; with and without the input
        embedding, which is a lookup), and the MTP modules' own (embedding and head shared),
        all and activated."""

        def count(module: nn.Module) -> int:
            biases = sum(
                b.numel() for n, b in module.named_buffers() if n.endswith("e_score_correction_bias")
            )
            return sum(p.numel() for p in module.parameters()) + biases

        def inactive(blocks) -> int:  # parameters of the routed experts a token does not use
            n = 0
            for block in blocks:
                experts = getattr(block.mlp, "experts", None)
                if experts is not None:
                    per_expert = sum(p.numel() for p in experts.parameters()) // experts.n_experts
                    n += (experts.n_experts - self.cfg.num_experts_per_tok) * per_expert
            return n

        mtp = count(self.mtp)
        total = count(self) - mtp
        activated = total - inactive(self.layers.values())
        return {
            "total_params": total,
            "activated_params": activated,
            "activated_params_without_embedding": activated - self.embed_tokens.weight.numel(),
            "mtp_params": mtp,
            "mtp_activated_params": mtp - inactive(self.mtp),
        }

    def training_flops_per_token(self, seq_len: int) -> float:
        """Forward + backward FLOPs per token in the paper's convention (ISCA Table 2): 6 x the
        activated matmul parameters (head included, input embedding not; MTP modules included
        when present) + causal attention 3 x layers x 2 x heads x (d_qk + d_v) x seq_len / 2."""
        counts = self.num_params()
        matmul = counts["activated_params_without_embedding"] + counts["mtp_activated_params"]
        if len(self.mtp):  # each MTP depth runs the shared head once more
            matmul += len(self.mtp) * self.lm_head.weight.numel()
        layers = self.cfg.num_hidden_layers + len(self.mtp)
        heads, d = self.cfg.num_attention_heads, self.cfg.qk_head_dim + self.cfg.v_head_dim
        return 6 * matmul + 3 * layers * 2 * heads * d * seq_len / 2

    # ------------------------------------------------------------------ forward
    def rope(self, start_pos: int | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, d_rope/2] for positions start_pos..start_pos+T-1, or [B, T, d_rope/2]
        when start_pos is a LongTensor [B] of per-sequence starts."""
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos[:, None] + torch.arange(length, device=start_pos.device)  # [B, T]
        else:
            positions = torch.arange(start_pos, start_pos + length, device=self.rope_inv_freq.device)
        return rope_cos_sin(self.rope_inv_freq, self.rope_attn_factor, positions)

    @property
    def is_pipeline_stage(self) -> bool:
        """True for a pipeline stage: the model with its embedding or its head removed."""
        return self.embed_tokens is None or self.lm_head is None

    def forward(
        self,
        input_ids: torch.Tensor,
        *carried: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        start_pos: int | torch.Tensor = 0,
        absorb: bool | None = None,
        return_logits: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        segments: torch.Tensor | None = None,
    ):
        """input_ids [B, T]. With a cache, the tokens sit at positions start_pos.. and attend to
        the cached ones; `absorb` picks the attention path (default: absorbed when decoding
        over a non-empty cache, naive otherwise). start_pos may be a LongTensor [B], one start
        per sequence (a batch of different lengths over a paged cache). Without labels,
        `logits_to_keep` > 0 computes the logits of the last that many positions only, and a
        LongTensor [B] the logits at one position per row ([B, 1, V]: a padded batch's last tokens).

        A pipeline stage returns (h, emb, balance) [B, T, H], [B, T, H], [1]; a stage without the
        embedding takes them as (input_ids=h, *carried=(emb, balance))."""
        if self.embed_tokens is not None:
            if carried:
                raise TypeError(
                    "Transformer.forward takes labels as a keyword: model(input_ids, labels=labels)"
                )
            h = emb = self.embed_tokens(input_ids)  # [B, T, H]
            balance = None
            if self.is_pipeline_stage:  # the first stage starts the balance loss that travels down the pipe
                balance = torch.zeros(1, device=h.device, requires_grad=torch.is_grad_enabled())
        else:
            h, (emb, balance) = input_ids, carried
        T = h.shape[1]
        if absorb is None:
            absorb = cache is not None and (isinstance(start_pos, torch.Tensor) or start_pos > 0)
        if segments is not None and cache is not None:
            raise ValueError("segments (packed documents) are for training without a cache")
        cos, sin, mask = self.positions(T, start_pos, segments)
        with_aux = labels is not None or self.is_pipeline_stage
        for block in self.layers.values():
            h, aux = block(h, cos, sin, with_aux, cache, start_pos, absorb, mask)
            balance = _add(balance, aux)
        if self.is_pipeline_stage:
            return h, emb, balance
        if labels is None:
            if isinstance(logits_to_keep, torch.Tensor):
                kept = h[torch.arange(h.shape[0], device=h.device), logits_to_keep][:, None]  # [B, 1, H]
            else:
                kept = h[:, -logits_to_keep:] if logits_to_keep else h
            return TransformerOutput(logits=self.lm_head(self.norm(kept)), hidden=h)  # [B, T, V]
        loss, mtp_loss, balance = self.losses(h, emb, balance, labels, segments)
        logits = self.lm_head(self.norm(h)) if return_logits else None
        return TransformerOutput(logits, loss, mtp_loss, balance, h)

    def positions(self, T: int, start_pos: int | torch.Tensor = 0, segments: torch.Tensor | None = None):
        """(cos, sin, attention mask or None) for T tokens from start_pos, or for packed documents:
        with segments [B, T], positions restart at each document ([B, T, d_rope/2] cos/sin) and the
        mask [B, 1, T, T] keeps attention causal and inside each document."""
        if segments is None:
            return (*self.rope(start_pos, T), None)
        index = torch.arange(T, device=segments.device).expand_as(segments)  # [B, T]
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        first = torch.where(starts, index, 0).cummax(dim=1).values  # each token's document start
        cos, sin = rope_cos_sin(self.rope_inv_freq, self.rope_attn_factor, index - first)
        same = segments[:, None, :, None] == segments[:, None, None, :]  # [B, 1, T, T]
        return cos, sin, same & torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()

    def losses(self, h, emb, balance, labels, segments=None):
        """The end of the forward with labels: (next-token CE, mean MTP CE or None, balance loss incl.
        the MTP blocks') from the last block's output h [B, T, H] and the embedding output emb."""
        cos, sin, mask = self.positions(h.shape[1], 0, segments)
        loss = linear_cross_entropy(self.norm(h), self.lm_head.weight, labels)
        mtp_loss, mtp_balance = self._mtp_loss(h, emb, labels, cos, sin, mask)
        return loss, mtp_loss, _add(balance, mtp_balance)

    def _mtp_loss(self, h, emb, labels, cos, sin, mask=None):
        """Mean over depths of the MTP cross entropies, and the MTP blocks' balance loss."""
        if not self.mtp:
            return None, None
        T = labels.shape[1]
        chain_ok = labels != IGNORE_INDEX  # [B, T]: positions i..i+k all have targets
        losses, balance = [], None
        for k, module in enumerate(self.mtp, start=1):
            if T <= k:
                break
            chain_ok = chain_ok[:, :-1] & (labels[:, k:] != IGNORE_INDEX)  # [B, T-k]
            h, aux = module(
                h[:, :-1],
                emb[:, k:],
                cos[..., k:, :],
                sin[..., k:, :],
                with_aux=True,
                mask=None if mask is None else mask[..., : T - k, : T - k],
            )  # [B, T-k, H]
            balance = _add(balance, aux)
            targets = labels[:, k:].masked_fill(~chain_ok, IGNORE_INDEX)
            losses.append(linear_cross_entropy(module.shared_head.norm(h), self.lm_head.weight, targets))
        return (torch.stack(losses).mean() if losses else None), balance

    # ------------------------------------------------------------------ checkpoints (HF layout)
    def save_pretrained(self, path: str | Path, max_shard_bytes: int | None = None) -> None:
        from dsv3.hf import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ):
        from dsv3.hf import load_pretrained

        return load_pretrained(path, device=device, dtype=dtype)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else (a if b is None else a + b)
