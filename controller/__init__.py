"""LlamaController: control plane (lifecycle, runtimes, management API, CLI)."""

__version__ = "0.1.0"
