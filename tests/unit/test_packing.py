"""Packed documents (`segments`): each document in a packed row is computed as if it were alone."""

import torch

from dsv3 import ModelConfig, Transformer

CFG = dict(
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
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    initializer_range=0.1,
)


def test_packed_documents_equal_documents_alone():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", **CFG)).double().eval()
    a, b = torch.randint(2, 64, (1, 5)), torch.randint(2, 64, (1, 7))
    packed = torch.cat((a, b), dim=1)
    segments = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        alone = torch.cat((model(a).logits, model(b).logits), dim=1)
        together = model(packed, segments=segments).logits
        unmasked = model(packed).logits
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(unmasked[:, 5:], alone[:, 5:])  # without segments b sees a


def test_packed_losses_and_mtp_equal_the_documents_alone():
    """Next-token and MTP cross entropy over a packed row = the token-weighted mean of the documents'
    own (the label between them is -100, which also cuts the MTP chains)."""
    torch.manual_seed(1)
    model = Transformer(ModelConfig.from_preset("tiny", **CFG)).double().eval()
    a, b = torch.randint(2, 64, (1, 9)), torch.randint(2, 64, (1, 8))
    ya, yb = torch.randint(2, 64, (1, 9)), torch.randint(2, 64, (1, 8))
    with torch.no_grad():
        ob = model(b, labels=yb)
        labels = torch.cat((ya, yb), dim=1)
        labels[0, 8] = -100  # the last token of a has no target inside its document
        out = model(torch.cat((a, b), dim=1), labels=labels, segments=torch.tensor([[0] * 9 + [1] * 8]))
        oa_cut = model(a, labels=torch.cat((ya[:, :8], torch.tensor([[-100]])), dim=1))
    # the cross entropy itself runs in FP32 (model/loss.py), so the means agree to FP32 rounding
    torch.testing.assert_close(out.loss, (oa_cut.loss * 8 + ob.loss * 8) / 16, rtol=1e-6, atol=0)
    # MTP depth 1: a contributes positions 0..6 (7 chains), b positions 0..6 (7 chains)
    torch.testing.assert_close(out.mtp_loss, (oa_cut.mtp_loss * 7 + ob.mtp_loss * 7) / 14, rtol=1e-6, atol=0)
