"""The tiny SGTM train spec the end-to-end engine tests share: 2 layers on the embedded corpus, a few steps."""

TINY_SGTM = {
    "model": {"n_layer": 2, "d_model": 64, "context": 32},
    "masking": {"strategy": "sgtm", "forget_mlp_dim": 32, "forget_attn_heads": 4},
    "data": {"corpus": "wiki-bilingual", "vocab_size": 512, "max_docs_per_split": 40, "test_docs_per_category": 2},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "steps": 4, "batch_size": 4, "log_every": 2,
    "eval": {"max_batches": 1, "capability": False},
}
