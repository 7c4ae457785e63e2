"""The package list, computed so that a new sub-package installs without editing this file.

The repository keeps ``cli/`` and ``reports/`` at its top level (next to ``cka_split/`` and ``vitsplit/``),
but installs them under the project's own name, as ``cka_split.cli`` and ``cka_split.reports``, so that
site-packages gets no generic top-level ``cli`` or ``reports``. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

# installed package name -> repository folder
MAPPED = {"cka_split.cli": "cli", "cka_split.reports": "reports"}

packages = find_packages(include=["cka_split", "cka_split.*", "vitsplit", "vitsplit.*"])
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(packages=packages, package_dir=MAPPED)
