"""Measurements beside CKA that feed or check a decision: the gradient-norm rival (Auto-RGN), PCA
maps of the patch tokens, and the ``--finetune-steps auto`` controller."""
