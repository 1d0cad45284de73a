"""The product's version, at the bottom floor so every part (gateway, worker, CLI) reads the same one.

pyproject.toml reads it from here too (`dynamic = ["version"]`), so the package metadata agrees.
"""

__version__ = "0.1.0"
