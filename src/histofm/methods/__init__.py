"""Self-supervised pretraining methods, one readable file each."""

from histofm.methods.base import SSLMethod

__all__ = ["SSLMethod"]
