"""Benchmark the unified model: training-step tokens/s for packed vs padded batches of the same
sequences, and generation tokens/s with and without the KV cache, in one run.

Uses the demo's tokens and BPE when present (`make demo`), else random sequences with the
same length spread:

    .venv/bin/python benchmarks/bench_model.py [--root runs/demo] [--device cpu|cuda] [--hidden 192]

"Useful tokens/s" counts only real (non-padding) tokens: padding is computed but wasted. Generation is
timed on its second run over the same lengths: on CUDA the first pass loads and chooses its kernels
(~8x slower on an H200), a cost an evaluation pays once, not per caption.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def sequences(root: str, n: int, rng):
    from tessera.config import load_config
    from tessera.manifest import dataset_files
    from tessera.model.assets import load_assets
    from tessera.model.rows import read_row
    from tessera.model.sequence import Sequence, SequenceBuilder
    from tessera.model.vocab import Vocabulary

    tokens = os.path.join(root, "tokens", "tokens")
    if os.path.exists(os.path.join(tokens, "manifest.json")):
        cfg = load_config(None, [f"run.root={root}"])
        assets = load_assets(cfg.model, cfg.resolve)
        vocab = assets.vocabulary(cfg.model)
        b = SequenceBuilder(vocab, assets.bpe)
        rows = [read_row(f, r) for f in dataset_files(tokens) for r in range(1000)
                if r < __import__("pyarrow.parquet", fromlist=["x"]).read_metadata(f).num_rows]
        seqs = [b.build(rows[i % len(rows)], "all", epoch=i // len(rows), t2i_rate=0.5) for i in range(n)]
        return vocab, seqs, "demo tokens"
    vocab = Vocabulary(text_size=1024, bos_id=1, eos_id=2, pad_id=0, interface="bpe", visual_size=1280)
    seqs = []
    for i in range(n):
        m = int(rng.integers(40, 400))
        seqs.append(Sequence(str(i), rng.integers(3, vocab.size, m), np.ones(m, bool)))
    return vocab, seqs, "random sequences"


def time_training(model, rows, batch_rows, device, steps):
    from tessera.model.packing import collate

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    real = total = 0
    t0 = None
    for s in range(steps + 1):
        i = (s * batch_rows) % max(1, len(rows) - batch_rows + 1)
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_rows]).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s == 0:  # warm-up step not timed
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            continue
        real += int((batch["doc_ids"] > 0).sum())
        total += batch["doc_ids"].numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return real / dt, total / dt, real / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="runs/demo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--sequences", type=int, default=192)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--gen-tokens", type=int, default=96)
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)

    from tessera.config import load_config
    from tessera.model.generate import generate_text
    from tessera.model.packing import pack, pad
    from tessera.model.unified import TesseraModel

    vocab, seqs, source = sequences(os.path.abspath(args.root), args.sequences, np.random.default_rng(0))
    cfg = load_config(None, [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", f"model.num_heads={max(1, args.hidden // 32)}",
                             "model.num_kv_heads=2", f"model.intermediate_size={args.hidden * 8 // 3}"]).model
    model = TesseraModel.create(cfg, vocab).to(device)
    longest = max(len(s) for s in seqs)
    packed_rows, ps = pack(seqs, args.seq_len, vocab.pad_id)
    padded_rows, qs = pad(seqs, min(args.seq_len, longest), vocab.pad_id)
    rows_per_batch = 4
    padded_batch = max(1, rows_per_batch * args.seq_len // min(args.seq_len, longest))  # same tokens per step
    print(f"# bench_model on {device} ({source}, {len(seqs)} sequences, mean length {np.mean([len(s) for s in seqs]):.0f}, "
          f"longest {longest}); model hidden {args.hidden} x {args.layers} layers, vocabulary {vocab.size}")
    p_real, p_all, p_eff = time_training(model, packed_rows, rows_per_batch, device, args.steps)
    q_real, q_all, q_eff = time_training(model, padded_rows, padded_batch, device, args.steps)
    print(f"training, packed  ({args.seq_len}-token rows):   {p_real:9.0f} useful tokens/s   (computed {p_all:.0f}/s, "
          f"non-padding {p_eff:.3f}, {ps['rows']} rows)")
    print(f"training, padded  (one sequence per row): {q_real:9.0f} useful tokens/s   (computed {q_all:.0f}/s, "
          f"non-padding {q_eff:.3f}, {qs['rows']} rows)")
    print(f"packed / padded useful tokens/s: {p_real / q_real:.2f}x")

    model.eval()
    prompt = seqs[0].ids[: min(len(seqs[0]), 160)]
    for use_cache in (True, False):
        def once():
            return generate_text(model, prompt, max_new_tokens=args.gen_tokens, use_cache=use_cache,
                                 temperature=1.0, generator=torch.Generator().manual_seed(0))
        once()  # warm-up over the same lengths: on CUDA the first pass loads and chooses its kernels
        # (measured on an H200: 25 tokens/s cold, ~190 warm), which an evaluation pays once, not per image
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        rate = len(out) / dt
        print(f"generation {'with' if use_cache else 'without'} KV cache: {rate:8.1f} tokens/s ({len(out)} tokens after a "
              f"{len(prompt)}-token prompt)")
        if use_cache:
            cached = rate
    print(f"KV cache speed-up: {cached / rate:.1f}x")


if __name__ == "__main__":
    main()
