"""Hypothesis test (not kept, README "Learning"): every visual token of an image shares one 1-D (RoPE)
position, so only the learned row/column embeddings say where it is. Patches experiments/answer_stage.py's
rows and the Decoder its probes use, then runs it with the same arguments:

    PYTHONPATH=. python experiments/shared_image_position.py runs/oracle-long --set tokenizer.preset=oracle \
        --set bpe.num_merges=0 --steps 720 --every 120 --threads 1
"""

import numpy as np
import torch
import experiments.answer_stage as A
import tessera.model.generate as G


def shared(positions: np.ndarray, cells: np.ndarray, docs: np.ndarray | None = None) -> np.ndarray:
    """positions (L,), cells (L, 2) -> positions where each image's visual tokens share its first's."""
    out = positions.copy()
    docs = np.zeros(len(positions), np.int64) if docs is None else docs
    vis = cells[:, 0] >= 0
    for d in np.unique(docs):
        at = np.flatnonzero(docs == d)
        v = vis[at]
        nonfirst = v & np.concatenate([[False], v[:-1]])
        vpos = np.sort(positions[at][nonfirst])
        out[at] = positions[at] - np.searchsorted(vpos, positions[at], side="right")
    return out


_collate = A.collate
def collate(rows):
    b = _collate(rows)
    pos, cells, docs = b["position_ids"].numpy(), b["cells"].numpy(), b["doc_ids"].numpy()
    b["position_ids"] = torch.from_numpy(np.stack([shared(pos[i], cells[i], docs[i]) for i in range(len(pos))]))
    return b
A.collate = collate

_arange = torch.arange
class SharedDecoder(G.Decoder):
    def feed(self, ids, codes=None, cells=None):
        ids_l = [int(i) for i in np.atleast_1d(ids)]
        cells_a = np.full((len(ids_l), 2), -1, np.int64) if cells is None else np.asarray(cells, np.int64).reshape(len(ids_l), 2)
        hist = np.concatenate([np.stack(self.cells) if self.cells else np.zeros((0, 2), np.int64), cells_a])
        full = shared(np.arange(len(hist)), hist)
        first = len(self.ids)
        real = torch.arange
        def patched(a, b=None, **kw):
            torch.arange = real  # one shot: the Decoder's own position ids only
            if b is not None and a == first and b == first + len(ids_l):
                return torch.from_numpy(full[first:]).to(kw.get("device"))
            return real(a, b, **kw) if b is not None else real(a, **kw)
        torch.arange = patched
        try:
            return super().feed(ids, codes, cells)
        finally:
            torch.arange = real
G.Decoder = SharedDecoder

if __name__ == "__main__":
    A.main()
