"""A small MLA model config shared by the attention and cache tests: q-LoRA, YaRN (mscale on the
softmax scale), 1 dense + 1 MoE layer with 8 experts in 2 groups, no MTP."""

SMALL = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
             q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
             first_k_dense_replace=1, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
             n_group=2, topk_group=1, num_nextn_predict_layers=0, max_position_embeddings=128,
             rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                           "mscale": 0.9, "mscale_all_dim": 0.9}, initializer_range=0.1)  # fmt: skip
