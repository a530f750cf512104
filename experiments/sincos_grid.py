"""Hypothesis test (not kept, README "Learning"): the row/column embeddings initialised with a smooth
2-D sin-cos table (MAE) instead of N(0, 0.02), so a linear query can select a contiguous region from the
first step. Wraps experiments/answer_stage.py with the same arguments:

    PYTHONPATH=. python experiments/sincos_grid.py runs/demo --steps 720 --every 120 --threads 1
"""
import math
import torch
import experiments.answer_stage as A
from tessera.model.unified import TesseraModel

def sincos(n: int, d: int, rms: float) -> torch.Tensor:
    p = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(d // 2, dtype=torch.float64)[None]
    ang = p / (n ** (2 * i / d)) * math.pi / 2
    t = torch.cat([torch.sin(ang), torch.cos(ang)], 1)
    t = t - t.mean(0, keepdim=True)
    return (t / t.pow(2).mean().sqrt() * rms).float()

_create = TesseraModel.create.__func__
def create(cls, cfg, vocab, *a, **k):
    m = _create(cls, cfg, vocab, *a, **k)
    with torch.no_grad():
        t = sincos(cfg.max_grid, m.grid_rows.weight.shape[1], 0.02)
        m.grid_rows.weight.copy_(t)
        m.grid_cols.weight.copy_(t.roll(m.grid_rows.weight.shape[1] // 4, dims=1))
    return m
TesseraModel.create = classmethod(create)
A.TesseraModel = TesseraModel
if __name__ == "__main__":
    A.main()
