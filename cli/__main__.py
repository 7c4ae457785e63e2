"""``python -m cka_split.cli ...`` runs the same app as ``cka-split ...``."""

from .app import main

main()
