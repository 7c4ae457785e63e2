"""Whole jobs over run directories: ``analyze`` / ``recommend``, ``compare``, and the offline demo."""
