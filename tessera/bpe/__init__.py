"""Visual BPE: a truly 2-D byte-pair encoding of VQ code grids (every token is a rectangle)."""

from tessera.bpe.model import VisualBPE

__all__ = ["VisualBPE"]
