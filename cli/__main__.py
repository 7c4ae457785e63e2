"""``python -m cli ...`` runs the same app as ``cka-split ...`` (so ``torchrun -m cli train`` works)."""

from cli.app import main

main()
