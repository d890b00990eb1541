"""Orvanta reference job runtime: runs untrusted scripts under none, unshare or nsjail."""

__version__ = "0.1.0"
