"""Operators: a functional core and a module form each (torchvision ``ops/`` style)."""
