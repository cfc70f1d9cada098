"""Output head and cross entropy fused, chunk by chunk, with the gradient computed in forward.

A language model's loss is cross_entropy(h @ W^T, targets) over a [tokens, vocab] logits
matrix: 64 MB in FP32 for 2,048 tokens of an 8K vocabulary, written, copied, read back by
log-softmax, and again as its gradient in backward. Here the rows are processed in chunks that
stay in cache; for each chunk the logits, their log-sum-exp (FP32), the loss, and the gradient
    G = dL/dlogits = (softmax(logits) - onehot(target)) / n_valid
are computed at once (one exp per logit: the log-sum-exp is taken from the same exponentials as
the softmax); G is kept in the GEMM dtype (half the FP32 logits under BF16) and the
two gradient GEMMs dL/dh = G W and dL/dW = G^T h run once, whole, at the end of forward. The
three GEMMs are those of the unfused head (no recomputation); backward only scales the saved
gradients by the incoming one, or, on a CPU, hands them on as they are where that is 1 (the main
loss: a [V, D] product less to allocate and write). `linear_cross_entropy_reference` is the plain version
the tests hold it to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ROWS = 128  # rows of logits per chunk (measured best for 8K-32K vocabularies on CPU)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # h [N, D], weight [V, D], targets [N]
        N, V = h.shape[0], weight.shape[0]
        valid = targets != IGNORE_INDEX
        n_valid = valid.sum().clamp(min=1)
        safe_targets = targets.clamp(min=0)
        grad_logits = torch.empty(N, V, dtype=h.dtype, device=h.device)  # in the GEMM dtype
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = CHUNK_ROWS
        for s in range(0, N, rows):
            hc, tc, ok = h[s : s + rows], safe_targets[s : s + rows], valid[s : s + rows]
            logits = (hc @ weight.t()).float()  # [c, V]
            target_logit = logits.gather(1, tc[:, None]).squeeze(1)
            peak = logits.amax(dim=-1)  # [c]
            grad = logits.sub_(peak[:, None]).exp_()  # exp(logits - max), in place: the one exp
            total = grad.sum(dim=-1)  # [c]
            loss += ((total.log() + peak - target_logit) * ok).sum()  # log-sum-exp - target logit
            scale = ok / n_valid  # [c]
            grad.mul_((scale / total)[:, None])  # softmax / n_valid
            grad.scatter_add_(1, tc[:, None], -scale[:, None])  # - onehot(target) / n_valid
            grad_logits[s : s + rows] = grad
        ctx.save_for_backward(grad_logits @ weight, grad_logits.t() @ h)  # dL/dh [N, D], dL/dW [V, D]
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # the main loss, as a sum of losses passes it: nothing to scale (checked where reading the
        # value costs no wait for an accelerator in the middle of backward)
        if grad_out.device.type == "cpu" and bool(grad_out == 1):
            return grad_h, grad_w, None
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean cross_entropy(h @ weight^T, targets) over targets != -100. h [..., D], targets [...].

    Under autocast the GEMMs run in its dtype (as an nn.Linear would); the softmax is FP32."""
    h = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1)
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        return linear_cross_entropy_reference(h, weight, targets)
    return _LinearCrossEntropy.apply(h, weight, targets)


def linear_cross_entropy_reference(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The unfused head + cross entropy: materializes the full logits."""
    logits = h.reshape(-1, h.shape[-1]) @ weight.t()
    return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)
