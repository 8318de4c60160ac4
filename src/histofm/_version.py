"""The package version, on the bottom floor so any module can record it (provenance, manifests)."""

__version__ = "0.1.0"
