"""Ray actors holding BPE shards: the only module of `tessera.bpe` that imports Ray.

Each actor owns one `_core.Shard` (its grids and position index never leave it); per merge
the driver sends (a, b, d, new id, shape) and receives only the count deltas.
"""

from __future__ import annotations

import time

import numpy as np
import ray

from tessera.bpe.shards import Corpus, GridSource, load_source, make_shard, peak_rss_mb


@ray.remote(num_cpus=0.5)
class ShardActor:
    def __init__(self, corpus: Corpus | GridSource, tiles: np.ndarray | None, shape_h: list[int], shape_w: list[int],
                 max_id: int | None = None):
        t0 = time.perf_counter()
        corpus = load_source(corpus, tiles, len(shape_h))  # a GridSource's grids are made or read here, in the actor
        self.load_s = time.perf_counter() - t0
        self.shard = make_shard(corpus, tiles, shape_h, shape_w, max_id)

    def ready(self) -> bool:
        return True

    def count(self):
        return self.shard.count()

    def apply(self, a, b, d, new_id, h, w):
        return self.shard.apply(a, b, d, new_id, h, w)

    def tiles(self):
        return self.shard.tiles()

    def stats(self):
        return {"cells": self.shard.num_cells(), "tiles": self.shard.num_tiles(), "index_entries": self.shard.index_entries(),
                "keys": self.shard.num_keys(), "compactions": self.shard.compactions(), "load_s": self.load_s,
                "peak_rss_mb": peak_rss_mb()}


class RayShards:
    """The `ShardSet` of `tessera.bpe.fit`, one Ray actor per shard (Ray must be initialised,
    or an embedded one is started)."""

    def __init__(self, corpora: list[Corpus | GridSource], tiles: list[np.ndarray] | None, shape_h: list[int], shape_w: list[int],
                 max_id: int | None = None):
        if not ray.is_initialized():
            ray.init()
        self.actors = [ShardActor.remote(c, None if tiles is None else tiles[i], shape_h, shape_w, max_id) for i, c in enumerate(corpora)]
        ray.get([a.ready.remote() for a in self.actors])  # built (and their grids loaded) inside the fit's `build` phase

    def count(self):
        return ray.get([a.count.remote() for a in self.actors])

    def apply(self, a, b, d, new_id, h, w):
        return ray.get([x.apply.remote(a, b, d, new_id, h, w) for x in self.actors])

    def tiles(self):
        return ray.get([a.tiles.remote() for a in self.actors])

    def stats(self):
        parts = ray.get([a.stats.remote() for a in self.actors])
        return {**{k: sum(p[k] for p in parts) for k in ("cells", "tiles", "index_entries", "keys", "compactions")},
                "load_s": max(p["load_s"] for p in parts), "shard_peak_rss_mb": [p["peak_rss_mb"] for p in parts]}

    def __del__(self):
        for a in getattr(self, "actors", []):
            try:
                ray.kill(a)
            except Exception:
                pass
