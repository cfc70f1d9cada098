"""Multi-token prediction: targets, document boundaries, depth > 1."""

import torch
import torch.nn.functional as F

from dsv3 import ModelConfig, Transformer
from dsv3.model.transformer import IGNORE_INDEX


def _model(depth):
    cfg = ModelConfig.from_preset(
        "tiny",
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=2,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        moe_intermediate_size=32,
        num_nextn_predict_layers=depth,
        initializer_range=0.1,
    )
    return Transformer(cfg).eval()


def _reference_mtp_loss(model, ids, labels):
    """Module by module, position by position, straight from V3R eq. 21-25."""
    out = model(ids)
    h, emb = out.hidden, model.embed_tokens(ids)
    T, losses = ids.shape[1], []
    for k, module in enumerate(model.mtp, start=1):
        cos, sin = model.rope(k, T - k)
        h, _ = module(h[:, :-1], emb[:, k:], cos, sin)
        logits = model.lm_head(module.shared_head.norm(h))
        nll, n = 0.0, 0
        for b in range(ids.shape[0]):
            for i in range(T - k):
                chain = labels[b, i : i + k + 1]
                if (chain == IGNORE_INDEX).any():
                    continue  # the chain i..i+k crosses a document boundary or padding
                nll += F.cross_entropy(logits[b, i], labels[b, i + k])
                n += 1
        losses.append(nll / n)
    return torch.stack(losses).mean()


def test_mtp_loss_matches_reference_with_document_boundaries():
    torch.manual_seed(0)
    model = _model(depth=2)
    ids = torch.randint(0, 64, (2, 12))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, 4] = IGNORE_INDEX  # document ends after position 4
    labels[1, 7] = IGNORE_INDEX
    with torch.no_grad():
        out = model(ids, labels=labels)
        ref = _reference_mtp_loss(model, ids, labels)
    torch.testing.assert_close(out.mtp_loss, ref, rtol=1e-5, atol=1e-6)
    assert out.balance_loss is not None and out.balance_loss > 0


def test_mtp_module_learns_the_token_after_next():
    """Gradients reach the MTP module: a few steps on a fixed pattern lower its loss."""
    torch.manual_seed(0)
    model = _model(depth=1).train()
    ids = torch.arange(16).repeat(4, 1) % 64
    labels = torch.roll(ids, -1, 1)
    opt = torch.optim.AdamW(model.mtp.parameters(), lr=3e-3)
    first = None
    for _ in range(20):
        loss = model(ids, labels=labels).mtp_loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5 * first


def test_no_mtp_no_mtp_loss():
    out = _model(depth=0)(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))
    assert out.mtp_loss is None and out.loss is not None
