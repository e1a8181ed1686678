"""Package layout (everything else is in pyproject.toml): the package, plus the checkout's `configs/` and the
shipped `models/` as package data under `tokenprune/_shipped/`, so an installed (non-editable) tokenprune
runs its configs and the `mini_shapes` miniature from any directory."""

from setuptools import find_packages, setup

SHIPPED = {"tokenprune._shipped.configs": "configs", "tokenprune._shipped.models": "models"}

setup(packages=[*find_packages(include=["tokenprune", "tokenprune.*"]), *SHIPPED], package_dir=SHIPPED)
