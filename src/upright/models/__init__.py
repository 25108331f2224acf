"""upright.models: the built-in models' files (pipeline/builtin.py; README.md here)."""
