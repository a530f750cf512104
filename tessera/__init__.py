"""Tessera: multimodal data to discrete token streams and a unified AR model, on Ray."""
__version__ = "0.1.0"
