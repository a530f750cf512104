"""Benchmark tokenizer encode: images/s at 64² and 256² for both presets, and the share of
encode time spent in quantisation (nearest-code search), measured in the same run by timing
the encoder alone and encoder + quantiser. On CUDA it also times bf16 autocast.

    .venv/bin/python benchmarks/bench_tokenizer.py [--batch 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tessera.config import load_config  # noqa: E402
from tessera.tokenize.tokenizer import build_tokenizer  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def bench(preset: str, size: int, batch: int, repeats: int, device: str, bf16: bool) -> dict:
    cfg = load_config(None, [f"tokenizer.preset={preset}", f"tokenizer.image_size={size}"]).tokenizer
    model = build_tokenizer(cfg).to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    ctx = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    if preset == "vq":
        def features():
            with ctx():
                return model.encoder(x).permute(0, 2, 3, 1)
        quantizers = [model.quantizer]
    else:
        def features():
            with ctx():
                p, s = model._features(x)
            return p, s
        quantizers = [model.pixel_quantizer, model.semantic_quantizer]
    feats = features()
    feats = feats if isinstance(feats, tuple) else (feats,)

    def quantize():
        for q, f in zip(quantizers, feats):
            q(f.float())

    def encode():
        with ctx():
            model.encode(x)

    t_encode = timed(encode, repeats)
    t_features = timed(features, repeats)
    t_quant = timed(quantize, repeats)
    return {"preset": preset, "size": size, "device": device, "bf16": bf16, "batch": batch,
            "images_per_s": round(batch / t_encode, 1), "quantization_share": round(t_quant / (t_features + t_quant), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    runs = [("cpu", False)] + ([("cuda", False), ("cuda", True)] if torch.cuda.is_available() else [])
    rows = []
    for device, bf16 in runs:
        for preset in ("vq", "dual"):
            for size in (64, 256):
                batch = args.batch if size == 64 or device == "cuda" else max(4, args.batch // 8)
                rows.append(bench(preset, size, batch, args.repeats, device, bf16))
                r = rows[-1]
                print(f"{r['preset']:<5}{r['size']:>5}px {r['device']:<5}{'bf16' if bf16 else 'fp32':<5}"
                      f"{r['images_per_s']:>10} img/s   quantization {100 * r['quantization_share']:.1f}% of encode", flush=True)
    print(json.dumps({"bench": "tokenizer", "threads": torch.get_num_threads(), "results": rows}))


if __name__ == "__main__":
    main()
