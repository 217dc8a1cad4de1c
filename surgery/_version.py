"""The package version, in its own module so that anything may import it without importing the API."""

__version__ = "0.1.0"
