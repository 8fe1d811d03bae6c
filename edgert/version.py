"""The package version (one place; pyproject.toml states the same for the build)."""
__version__ = "0.1.0"
