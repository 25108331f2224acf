"""Install the orientation toolkit: everything is declared in pyproject.toml.

This file stays for tools that still look for it; `pip install .` and
`pip install -e .` read pyproject.toml (PEP 517/660) and never run it directly.
"""
import setuptools

setuptools.setup()
