"""`tessera tokenize`: interleaved samples -> token shards (Ray Data, tokenizer in an actor pool).

    samples --CPU: PNG -> arrays--> actor pool (visual tokenizer; num_gpus per actor on a cluster)
            --CPU: text tokenizer--> _work/encoded --> tokens/*.parquet + rejects/*.parquet -> manifests -> report

The text tokenizer is the configured `from_pretrained` one, or a byte-level BPE trained here on
the prepared texts. Same commit protocol as `prepare`: idempotent, resumable, exactly-once.
Scaling out is `tokenize.num_actors` (and `num_gpus_per_actor`), not a code change.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

from tessera import storage
from tessera.config import TesseraConfig
from tessera.faults import fault_point
from tessera.jobs.common import JobState, Timer, fingerprint, parse_args, ray_session
from tessera.manifest import dataset_files, write_manifest
from tessera.schema import REJECT_SCHEMA, TOKEN_SCHEMA, validated


def tokenize(cfg: TesseraConfig) -> dict:
    import ray.data

    from tessera.tokenize import tokens
    from tessera.tokenize.ray_job import TokenizeActor
    from tessera.tokenize.text import load_text_tokenizer, segment_text, text_tokenizer_identity, train_text_tokenizer
    from tessera.tokenize.tokenizer import tokenizer_identity

    kc = cfg.tokenize
    out = os.path.abspath(cfg.resolve(kc.output))
    samples_dir = storage.join(cfg.resolve(cfg.prepare.output), "samples")
    files = dataset_files(samples_dir)
    tok_dir = os.path.abspath(cfg.resolve(kc.tokenizer))
    tok_id = tokenizer_identity(tok_dir)
    with open(os.path.join(tok_dir, "config.json")) as f:
        image_size = json.load(f)["tokenizer"]["image_size"]
    inputs = storage.read_json(storage.join(samples_dir, "manifest.json"))["files"]
    state = JobState(out, fingerprint(dataclasses.asdict(kc), inputs, tok_id["hash"]))
    if state.is_complete():
        print(f"[tessera] tokenize: complete, nothing to do ({state.report_uri})")
        return storage.read_json(state.report_uri) | {"skipped": True}
    total_cpus = ray.cluster_resources().get("CPU", 0)
    if kc.num_actors * kc.cpus_per_actor > total_cpus - 1:
        # the actor pool would hold every CPU and Ray Data's read tasks could never run: a silent hang
        raise ValueError(f"tokenize.num_actors x tokenize.cpus_per_actor = {kc.num_actors * kc.cpus_per_actor:g} CPUs leaves less "
                         f"than one of the cluster's {total_cpus:g} CPUs for reading; lower either (fractional CPUs are fine)")
    state.begin()
    timer = Timer()

    # ---- text tokenizer
    text_dir = kc.text_tokenizer or os.path.join(out, "text_tokenizer")
    if not kc.text_tokenizer and not os.path.exists(os.path.join(text_dir, "tokenizer.json")):
        with timer("text-tokenizer"):
            texts = ray.data.read_parquet(files).select_columns(["texts"])
            corpus = [segment_text(t) for b in texts.iter_batches(batch_format="pyarrow", batch_size=None)
                      for row in b.column("texts").to_pylist() for t in row if t]
            train_text_tokenizer(corpus, kc.text_vocab_size, text_dir)
    text_id = text_tokenizer_identity(text_dir)
    load_text_tokenizer(text_dir)  # fail here, before the pipeline, if it cannot load

    # ---- the pipeline
    encoded = storage.join(state.work, "encoded")
    if not state.step_done("encode"):
        target = state.step_dir("encoded", fresh=True)
        with timer("encode"):
            ds = ray.data.read_parquet(files)
            ds = ds.map_batches(tokens.decode_stage, fn_kwargs={"image_size": image_size}, batch_format="pyarrow",
                                batch_size=kc.batch_size, num_cpus=0.5)
            # blocks of one actor batch, streamed (no shuffle), so work spreads over the whole pool
            ds = ds.repartition(target_num_rows_per_block=kc.batch_size)
            ds = ds.map_batches(TokenizeActor, fn_constructor_kwargs={"tokenizer_dir": tok_dir, "image_size": image_size,
                                                                      "chunk": kc.encode_batch, "fault_marker": kc.fault_marker},
                                compute=ray.data.ActorPoolStrategy(size=kc.num_actors, max_tasks_in_flight_per_actor=2),
                                batch_size=kc.batch_size,
                                batch_format="pyarrow", num_cpus=kc.cpus_per_actor, num_gpus=kc.num_gpus_per_actor or None,
                                max_restarts=-1, max_task_retries=-1)
            ds = ds.map_batches(tokens.text_stage, fn_kwargs={"text_tokenizer": text_dir, "tokenizer_hash": tok_id["hash"],
                                                             "text_tokenizer_hash": text_id["hash"]},
                                batch_format="pyarrow", num_cpus=0.5)
            ds.write_parquet(target, min_rows_per_file=kc.rows_per_shard)
        state.mark_done("encode", {"seconds": timer.seconds["encode"]})
        fault_point("tokenize:after_encode")
    encode_s = state.step_info("encode")["seconds"]

    # ---- commit: tokens and rejects, manifests pinning both tokenizers, report
    tokens_dir, rejects_dir = storage.join(out, "tokens"), storage.join(out, "rejects")
    with timer("write"):
        storage.remove_tree(tokens_dir)
        storage.remove_tree(rejects_dir)
        src = ray.data.read_parquet(encoded)
        src.map_batches(validated(tokens.split_tokens, TOKEN_SCHEMA), batch_format="pyarrow", num_cpus=0.5) \
           .write_parquet(tokens_dir, min_rows_per_file=kc.rows_per_shard)
        fault_point("tokenize:after_tokens")
        src.map_batches(validated(tokens.split_rejects, REJECT_SCHEMA), batch_format="pyarrow", num_cpus=0.5) \
           .write_parquet(rejects_dir, min_rows_per_file=kc.rows_per_shard)
        stats = src.select_columns(["is_image", "text_ids", "pixel_codes", "reject_reason", "busy_s", "idle_s", "actor", "kind"])
        rows = [r for b in stats.iter_batches(batch_format="pyarrow", batch_size=None) for r in b.to_pylist()]
    identities = {"tokenizer": tok_id, "text_tokenizer": text_id}
    m_tokens = write_manifest(tokens_dir, "token", "tessera tokenize", dataclasses.asdict(kc), identities)
    m_rejects = write_manifest(rejects_dir, "reject", "tessera tokenize", dataclasses.asdict(kc), identities)

    good = [r for r in rows if r["reject_reason"] is None]
    n_images = sum(sum(r["is_image"]) for r in good)
    per_actor: dict = collections.defaultdict(lambda: {"rows": 0, "busy_s": 0.0, "idle_s": 0.0})
    for r in rows:
        a = per_actor[r["actor"] or "none"]
        a["rows"] += 1
        a["busy_s"] += r["busy_s"] or 0.0
        a["idle_s"] += r["idle_s"] or 0.0
    images_per_actor = {k: round(sum(sum(x["is_image"]) for x in good if x["actor"] == k) / max(v["busy_s"], 1e-9), 2)
                        for k, v in per_actor.items()}
    busy, idle = sum(v["busy_s"] for v in per_actor.values()), sum(v["idle_s"] for v in per_actor.values())
    report = {
        "job": "tokenize", "rows_in": len(rows), "rows_out": m_tokens["num_rows"], "rejects": m_rejects["num_rows"],
        "rejects_by_reason": dict(collections.Counter(r["reject_reason"] for r in rows if r["reject_reason"])),
        "images": n_images,
        "text_tokens": sum(len(ids) for r in good for ids in r["text_ids"]),
        "image_codes": sum(len(c) for r in good for c in r["pixel_codes"]),
        "images_per_s": round(n_images / max(encode_s, 1e-9), 2),
        "images_per_s_per_actor": images_per_actor,
        "actor_wait_fraction": round(idle / max(busy + idle, 1e-9), 3),
        "seconds": {"encode": encode_s, **timer.seconds},
        "identities": identities, "outputs": {"tokens": tokens_dir, "rejects": rejects_dir}, "config": cfg.to_dict(),
    }
    state.finish(report)
    return report


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_args("tokenize", argv, "Interleaved samples -> token shards with the visual and text tokenizers (Ray Data).")
    with ray_session(cfg.ray):
        report = tokenize(cfg)
    print(f"[tessera] tokenize: {report['rows_out']} rows, {report['images']} images, {report['text_tokens']} text tokens, "
          f"{report['image_codes']} image codes, {report['rejects']} rejects")
    print(f"[tessera] report: {cfg.resolve(cfg.tokenize.output)}/report.json")
    return report


if __name__ == "__main__":
    main()
