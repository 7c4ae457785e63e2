"""The ``cka-split`` command line: parses, prints, exits. No logic beyond wiring."""
