"""`tessera tokenize`: interleaved samples -> token shards (Ray Data, tokenizer in an actor pool).

    samples --> actor pool: PNG -> arrays -> visual tokenizer -> text tokenizer --> _work/encoded
            --> tokens/*.parquet + rejects/*.parquet -> manifests -> report
    (GPU actors, `num_gpus_per_actor` > 0: the PNG decode and the text tokenizer are CPU tasks around the pool)

The text tokenizer is the configured `from_pretrained` one, or a byte-level BPE trained here on
the prepared texts, streamed from Ray Data (never gathered on the driver). Same commit protocol as
`prepare`: idempotent, resumable, exactly-once. The report's counts are summed from one small
dict per block, so the driver's memory does not grow with the dataset. Scaling out is
`tokenize.num_actors` (and `num_gpus_per_actor`), not a code change.
"""

from __future__ import annotations

import dataclasses
import os

from tessera import storage
from tessera.config import TesseraConfig
from tessera.console import Console
from tessera.faults import actor_fault_marker, fault_point
from tessera.jobs.common import JobState, fingerprint, logs_dir, parse_args, ray_session
from tessera.timing import Timer
from tessera.manifest import dataset_files, write_manifest
from tessera.schema import REJECT_SCHEMA, token_schema, validated


def tokenize(cfg: TesseraConfig) -> dict:
    """Run (or skip, or finish) the job; returns its report. Ray must be initialised."""
    from tessera.tokenize.tokenizer import read_config, tokenizer_identity

    kc = cfg.tokenize
    out = os.path.abspath(cfg.resolve(kc.output))
    samples_dir = storage.join(cfg.resolve(cfg.prepare.output), "samples")
    files = dataset_files(samples_dir)
    tok_dir = os.path.abspath(cfg.resolve(kc.tokenizer))
    tok_id, image_size = tokenizer_identity(tok_dir), read_config(tok_dir)[0].image_size
    inputs = storage.read_json(storage.join(samples_dir, "manifest.json"))["files"]
    state = JobState(out, fingerprint(dataclasses.asdict(kc), inputs, tok_id["hash"]))
    if state.is_complete():
        print(f"[tessera] tokenize: complete, nothing to do ({state.report_uri})")
        return storage.read_json(state.report_uri) | {"skipped": True}
    _check_pool_leaves_cpu(kc)
    state.begin()
    timer = Timer()
    text_dir, text_id = _text_tokenizer(kc, files, out, timer)
    identities = {"tokenizer": tok_id, "text_tokenizer": text_id}
    encoded = _encode(state, kc, files, tok_dir, image_size, text_dir, identities, timer)
    outputs, stats = _commit(encoded, out, kc, identities, timer)
    report = {"job": "tokenize", **_summary(stats, state.step_info("encode")["seconds"]),
              "seconds": {"encode": state.step_info("encode")["seconds"], **timer.seconds},
              "identities": identities, "outputs": outputs, "config": cfg.to_dict()}
    state.finish(report)
    return report


def _check_pool_leaves_cpu(kc) -> None:
    import ray

    total_cpus = ray.cluster_resources().get("CPU", 0)
    if kc.num_actors * kc.cpus_per_actor > total_cpus - 1:
        # the actor pool would hold every CPU and Ray Data's read tasks could never run: a silent hang
        raise ValueError(f"tokenize.num_actors x tokenize.cpus_per_actor = {kc.num_actors * kc.cpus_per_actor:g} CPUs leaves less "
                         f"than one of the cluster's {total_cpus:g} CPUs for reading; lower either (fractional CPUs are fine)")


def _text_tokenizer(kc, files: list[str], out: str, timer) -> tuple[str, dict]:
    """The configured text tokenizer, or a byte-level BPE trained on the prepared texts, streamed block by
    block into `tokenizers`' trainer. Fails here, before the pipeline, if it cannot load."""
    import ray.data

    from tessera.tokenize.text import load_text_tokenizer, segment_text, text_tokenizer_identity, train_text_tokenizer

    text_dir = kc.text_tokenizer or os.path.join(out, "text_tokenizer")
    if not kc.text_tokenizer and not os.path.exists(os.path.join(text_dir, "tokenizer.json")):
        with timer("text-tokenizer"):
            blocks = ray.data.read_parquet(files).select_columns(["texts"]).iter_batches(batch_format="pyarrow", batch_size=None)
            corpus = (segment_text(t) for b in blocks for row in b.column("texts").to_pylist() for t in row if t)
            train_text_tokenizer(corpus, kc.text_vocab_size, text_dir)
    load_text_tokenizer(text_dir)
    return text_dir, text_tokenizer_identity(text_dir)


def _encode(state: JobState, kc, files: list[str], tok_dir: str, image_size: int, text_dir: str, identities: dict,
            timer) -> str:
    """read -> actor pool (PNG decode, visual tokenizer, text tokenizer) -> _work/encoded; with GPU actors the
    decode and the text tokenizer run as CPU tasks before and after the pool."""
    import ray.data

    from tessera.tokenize import tokens
    from tessera.tokenize.ray_job import TokenizeActor

    encoded = storage.join(state.work, "encoded")
    if state.step_done("encode"):
        return encoded
    target = state.step_dir("encoded", fresh=True)
    text_kwargs = {"text_tokenizer": text_dir, "tokenizer_hash": identities["tokenizer"]["hash"],
                   "text_tokenizer_hash": identities["text_tokenizer"]["hash"]}
    whole_rows = not kc.num_gpus_per_actor  # CPU actors decode and text-tokenize their own rows (see TokenizeActor)
    with timer("encode"):
        ds = ray.data.read_parquet(files)
        if not whole_rows:
            ds = ds.map_batches(tokens.decode_stage, fn_kwargs={"image_size": image_size}, batch_format="pyarrow",
                                batch_size=kc.batch_size, num_cpus=0.5)
        # blocks of one actor batch, streamed (no shuffle), so work spreads over the whole pool
        ds = ds.repartition(target_num_rows_per_block=kc.batch_size)
        ds = ds.map_batches(TokenizeActor, fn_constructor_kwargs={"tokenizer_dir": tok_dir, "image_size": image_size,
                                                                  "chunk": kc.encode_batch,
                                                                  "fault_marker": actor_fault_marker(state.output),
                                                                  "features": kc.features,
                                                                  "whole_rows": text_kwargs if whole_rows else None},
                            compute=ray.data.ActorPoolStrategy(size=kc.num_actors, max_tasks_in_flight_per_actor=2),
                            batch_size=kc.batch_size, batch_format="pyarrow", num_cpus=kc.cpus_per_actor,
                            num_gpus=kc.num_gpus_per_actor or None)  # Ray restarts pool actors and retries their tasks by default
        if not whole_rows:
            ds = ds.map_batches(tokens.text_stage, fn_kwargs=text_kwargs, batch_format="pyarrow", num_cpus=0.5)
        ds.write_parquet(target, min_rows_per_file=kc.rows_per_shard)
    state.mark_done("encode", {"seconds": timer.seconds["encode"]})
    fault_point("tokenize:after_encode")
    return encoded


def _commit(encoded: str, out: str, kc, identities: dict, timer) -> tuple[dict, dict]:
    """tokens and rejects (replacing any earlier attempt's), manifests pinning both tokenizers, and the
    counts of the encoded rows (one small dict per block, summed here)."""
    import ray.data

    from tessera.tokenize import tokens

    tokens_dir, rejects_dir = storage.join(out, "tokens"), storage.join(out, "rejects")
    with timer("write"):
        storage.remove_tree(tokens_dir)
        storage.remove_tree(rejects_dir)
        src = ray.data.read_parquet(encoded)
        src.map_batches(validated(tokens.split_tokens, token_schema(kc.features)), batch_format="pyarrow", num_cpus=0.5) \
           .write_parquet(tokens_dir, min_rows_per_file=kc.rows_per_shard)
        fault_point("tokenize:after_tokens")
        src.map_batches(validated(tokens.split_rejects, REJECT_SCHEMA), batch_format="pyarrow", num_cpus=0.5) \
           .write_parquet(rejects_dir, min_rows_per_file=kc.rows_per_shard)
        per_block = src.map_batches(tokens.block_statistics, batch_format="pyarrow", batch_size=None, num_cpus=0.5)
        stats = tokens.merge_statistics(r["stats"] for r in per_block.iter_rows())
    m_tokens = write_manifest(tokens_dir, "token", "tessera tokenize", dataclasses.asdict(kc), identities)
    m_rejects = write_manifest(rejects_dir, "reject", "tessera tokenize", dataclasses.asdict(kc), identities)
    stats.update(rows_out=m_tokens["num_rows"], rejects=m_rejects["num_rows"])
    return {"tokens": tokens_dir, "rejects": rejects_dir}, stats


def _summary(stats: dict, encode_s: float) -> dict:
    actors = stats["actors"]
    busy, idle = sum(a["busy_s"] for a in actors.values()), sum(a["idle_s"] for a in actors.values())
    return {
        "rows_in": stats["rows"], "rows_out": stats["rows_out"], "rejects": stats["rejects"],
        "rejects_by_reason": stats["rejects_by_reason"], "images": stats["images"], "text_tokens": stats["text_tokens"],
        "image_codes": stats["image_codes"], "images_per_s": round(stats["images"] / max(encode_s, 1e-9), 2),
        "images_per_s_per_actor": {k: round(a["images"] / max(a["busy_s"], 1e-9), 2) for k, a in actors.items()},
        "actor_wait_fraction": round(idle / max(busy + idle, 1e-9), 3),
    }


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_args("tokenize", argv, "Interleaved samples -> token shards with the visual and text tokenizers (Ray Data).")
    with Console(logs_dir(cfg)) as console:
        with console.stage("tokenize") as line, ray_session(cfg.ray):
            report = tokenize(cfg)
            line.note = "complete, nothing to do" if report.get("skipped") else ""
        console.print(f"[tessera] tokenize: {report['rows_out']} rows, {report['images']} images, {report['text_tokens']} text "
                      f"tokens, {report['image_codes']} image codes, {report['rejects']} rejects")
        console.print(f"[tessera] report: {cfg.resolve(cfg.tokenize.output)}/report.json")
    return report


if __name__ == "__main__":
    main()
