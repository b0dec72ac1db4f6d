"""Tiny world and model configs that keep the demo tests to seconds."""

TINY_WORLD = dict(
    seed=7, n_finetune_entities=12, n_heldout_entities=4, relations=("birth_city", "sport"),
    docs_per_fact=2, n_distractor_docs=6, n_shards=2,
)
TINY_TRAIN = dict(
    hidden_size=32, num_layers=1, num_heads=2, max_length=64, pretrain_epochs=12, pretrain_batch_size=16,
    pretrain_lr=5e-3, finetune_epochs=3, finetune_batch_size=8, finetune_lr=1e-3, num_threads=1,
    device="cpu",
)
