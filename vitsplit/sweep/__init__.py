"""``cka-split sweep``: ViT-Split trained at several K_t and seeds next to the baselines, every point
an ordinary training run (:mod:`vitsplit.sweep.grid`)."""
