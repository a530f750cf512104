"""Typed, validated configuration.

One dataclass per concern, composed into `TesseraConfig`. YAML is loaded into the
dataclasses by `load_config`, which rejects unknown keys and wrong types *before any
work starts* and names the offending key (`prepare.sources[1].kind`) and what was
expected. `__post_init__` methods check values and derive the rest. `--set a.b=v`
overrides are parsed as YAML scalars and must keep the field's type.

Locations are URIs resolved through `pyarrow.fs` (see `tessera.storage`); the
placeholder `{root}` in any location expands to `run.root`.
"""

from __future__ import annotations

import copy

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration key has a bad name, type or value. The message names the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.reason = message
        super().__init__(f"config error at '{key}': {message}")

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its key inside the section at `prefix` (`tokenizer.vq` + `channels`)."""
        key = ".".join(p for p in (prefix, self.key) if p).replace(".[", "[")
        return ConfigError(key, self.reason)


def _check(cond: bool, key: str, message: str) -> None:
    """A value check inside a section's `__post_init__`; `key` is relative to the section (`channels`,
    `stages[0].batch_size`, or "" for the section itself): the builder knows where the section sits
    and adds the path, so one check class names the right key wherever it is nested (an `RVQConfig`
    under `tokenizer.dual.pixel_rvq` as well as under `tokenizer.vq.rvq`)."""
    if not cond:
        raise ConfigError(key, message)


# ----------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    name: str = "demo"
    """Run name: names the output directory and the Ray Train run."""
    root: str = ""
    """Where every job of this run writes; default `runs/<name>`. A local path or a
    `s3://`/`gs://` URI that every node of the cluster can reach."""
    seed: int = 0
    """Global seed; every job derives its own from it."""

    DERIVED = ("root",)

    def __post_init__(self):
        _check(bool(self.name) and "/" not in self.name, "name", f"a non-empty name without '/', got {self.name!r}")
        if not self.root:
            self.root = f"runs/{self.name}"


@dataclass
class RayConfig:
    address: str = ""
    """Ray cluster to join; empty = `RAY_ADDRESS` if set, else start an embedded local Ray."""
    num_cpus: Optional[int] = None
    """CPUs of the embedded Ray (None = all cores)."""
    object_store_memory_mb: int = 1024
    """Object store of the embedded Ray; small machines need it bounded."""
    include_dashboard: bool = False
    """Start the dashboard of the embedded Ray (bound to 127.0.0.1 only)."""

    def __post_init__(self):
        _check(self.num_cpus is None or self.num_cpus >= 1, "num_cpus", f"None or >= 1, got {self.num_cpus}")
        _check(self.object_store_memory_mb >= 128, "object_store_memory_mb", f">= 128, got {self.object_store_memory_mb}")


@dataclass
class SynthConfig:
    """The built-in shapes world (`tessera synth`)."""

    output: str = "{root}/synth"
    resolution: int = 64
    """Side of the square images and video frames, in pixels."""
    num_image_text: int = 256
    """Image-caption pairs, written both as webdataset shards and as an HF dataset (half each)."""
    samples_per_shard: int = 64
    """Image-caption pairs per webdataset tar shard."""
    num_videos: int = 8
    video_seconds: float = 3.0
    video_fps: int = 8
    num_documents: int = 24
    """Interleaved web documents (2-4 images each)."""
    num_instruct: int = 128
    """Visual question answering conversations (image + question/answer turns) about training scenes."""
    num_heldout: int = 48
    """Held-out scenes; each gets attribute, count and POPE-style existence questions."""
    backgrounds: Literal["varied", "plain"] = "varied"
    """`varied`: tinted flat or gradient backgrounds with mild noise; `plain`: the same objects on
    flat grey backgrounds (five levels) with faint noise (see `tessera.pipelines.shapes`)."""
    snap_grid: int = 0
    """0: objects jitter freely inside their cell. G > 0: they jitter by whole blocks of a GxG lattice
    (set it to the tokenizer's code grid, image_size / 2**num_down), so an object has the same codes
    wherever it sits and the visual BPE can merge them (README "Learning")."""
    existence_probes: Literal["one", "every_object"] = "one"
    """Existence questions in each training VQA conversation: `one` "yes" and one "no" (as the held-out
    set asks), or `every_object`: also a "yes" for every object and as many "no" probes, preferring an
    absent pair of one object's colour and another's shape (`shapes.existence_probes`; README "Learning").
    The held-out set is the same either way."""
    inject_faults: bool = True
    """Also write bad inputs (corrupt, truncated, missing captions, decompression bombs,
    unsafe paths, duplicates) so the rejects path is always exercised."""

    def __post_init__(self):
        _check(16 <= self.resolution <= 1024, "resolution", f"16..1024, got {self.resolution}")
        for key in ("num_image_text", "num_videos", "num_documents", "num_instruct", "num_heldout"):
            _check(getattr(self, key) >= 0, key, f">= 0, got {getattr(self, key)}")
        _check(self.samples_per_shard >= 1, "samples_per_shard", f">= 1, got {self.samples_per_shard}")
        _check(self.snap_grid >= 0, "snap_grid", f">= 0, got {self.snap_grid}")
        _check(self.video_seconds > 0, "video_seconds", f"> 0, got {self.video_seconds}")
        _check(1 <= self.video_fps <= 60, "video_fps", f"1..60, got {self.video_fps}")


SourceKind = Literal["webdataset", "hf_dataset", "video", "web",
                     "img2dataset", "llava", "obelics", "mint1t", "video2dataset", "video_csv"]


@dataclass
class SourceConfig:
    """One input of `prepare`."""

    name: str
    """Source name recorded in every sample (`source` column) and in sample ids."""
    kind: SourceKind
    uri: str
    """webdataset: a directory of .tar shards; hf_dataset: a `save_to_disk` directory or a directory of
    parquet files with an `Image()` column; video: a directory of videos (any container decord reads)
    with `<stem>.srt`, `<stem>.vtt` or `<stem>.json` subtitles beside each; web: a directory of .jsonl
    documents (image paths relative to the file); img2dataset: its output folder (`{shard}.tar` +
    `{shard}.parquet`); llava: a JSON array file, a JSONL file or a directory of them; obelics: a
    directory of parquet files (`texts`, `images` as URLs, `metadata`); mint1t and video2dataset: a
    directory of webdataset .tar shards; video_csv: a CSV manifest (`path, caption[, start, end]`) or a
    directory of them, video paths relative to the manifest."""
    caption_key: str = "txt"
    """webdataset: extension holding the caption (`txt`, or `json` with a `caption` field);
    hf_dataset: the caption column."""
    image_key: str = "jpg"
    """webdataset: image extension; hf_dataset: the image column."""
    id_key: str = ""
    """hf_dataset: column with a stable row key (empty = row index, or a content hash for parquet)."""
    image_folder: str = ""
    """llava: the folder its relative `image` paths are resolved under (paths that escape it are rejected)."""

    def __post_init__(self):
        _check(self.kind != "llava" or bool(self.image_folder), "image_folder",
               f"set for llava source '{self.name}' (the folder its `image` paths are relative to)")


@dataclass
class ImageConfig:
    resolution: int = 64
    """Output side: images are resized so the short side equals it, then `fit` applies."""
    fit: Literal["crop", "pad", "stretch"] = "crop"
    """crop = center crop to a square; pad = letterbox; stretch = ignore aspect."""
    min_side: int = 16
    """Reject images whose short side (before resizing) is smaller."""
    max_aspect_ratio: float = 3.0
    """Reject images whose long/short side ratio is larger."""
    max_pixels: int = 40_000_000
    """Reject images declaring more pixels than this (decompression bombs), from the header, before decoding."""

    def __post_init__(self):
        _check(8 <= self.resolution <= 4096, "resolution", f"8..4096, got {self.resolution}")
        _check(self.min_side >= 1, "min_side", f">= 1, got {self.min_side}")
        _check(self.max_aspect_ratio >= 1.0, "max_aspect_ratio", f">= 1.0, got {self.max_aspect_ratio}")
        _check(self.max_pixels >= self.resolution**2, "max_pixels", f">= resolution**2, got {self.max_pixels}")


@dataclass
class VideoConfig:
    target_fps: float = 2.0
    """Frames sampled per second of video."""
    max_frames: int = 8
    """Cap on frames per clip."""
    require_text: bool = True
    """Reject videos without any subtitle (as `missing_caption`)."""

    def __post_init__(self):
        _check(self.target_fps > 0, "target_fps", f"> 0, got {self.target_fps}")
        _check(self.max_frames >= 1, "max_frames", f">= 1, got {self.max_frames}")


@dataclass
class TextFilterConfig:
    min_chars: int = 3
    """Reject captions (and documents whose texts together are) shorter than this."""
    max_chars: int = 4000

    def __post_init__(self):
        _check(0 <= self.min_chars <= self.max_chars, "", f"0 <= min_chars <= max_chars, got {self.min_chars}, {self.max_chars}")


@dataclass
class CurriculumConfig:
    """How `difficulty` tags are derived (used by training-stage mixtures)."""

    easy_max_objects: int = 1
    """image_text samples with at most this many objects (or caption words <= easy_max_words) are easy."""
    easy_max_words: int = 8
    hard_min_words: int = 20
    """Captions with at least this many words, and all web/video samples with several images, are hard."""


@dataclass
class DownloadConfig:
    """The bounded, retrying, timed-out download of images referenced by URL (obelics documents)."""

    timeout_s: float = 10.0
    """Connect and read timeout of one request."""
    retries: int = 2
    """Retries after the first attempt on a timeout, a dropped connection, 429 or 5xx (never on 404)."""
    backoff_s: float = 0.5
    """Exponential backoff base between retries."""
    max_concurrency: int = 8
    """Parallel requests per normalisation task."""
    max_bytes: int = 20_000_000
    """Responses larger than this are refused (`download_failed`)."""
    cache: str = "{root}/cache/downloads"
    """Each URL's bytes (or its permanent failure: 404, not an image) are kept here, so a re-run or a
    resumed run does not download again."""

    def __post_init__(self):
        _check(self.timeout_s > 0, "timeout_s", f"> 0, got {self.timeout_s}")
        _check(0 <= self.retries <= 10, "retries", f"0..10, got {self.retries}")
        _check(self.max_concurrency >= 1, "max_concurrency", f">= 1, got {self.max_concurrency}")


@dataclass
class PrepareConfig:
    output: str = "{root}/prepare"
    sources: list[SourceConfig] = field(default_factory=list)
    """Inputs; empty = the shapes world written by `tessera synth` (all four kinds)."""
    image: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    text: TextFilterConfig = field(default_factory=TextFilterConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    dedup: bool = True
    """Drop exact duplicates by content hash; the copy with the smallest sample_id survives."""
    rows_per_shard: int = 256
    """Target rows per output parquet shard."""
    batch_size: int = 16
    """Rows per `map_batches` call of the normalisation stage."""
    num_cpus_per_task: float = 0.5
    """CPU reservation of each normalisation task (fractional so reads are not starved on small machines)."""

    def __post_init__(self):
        _check(self.rows_per_shard >= 1, "rows_per_shard", f">= 1, got {self.rows_per_shard}")
        _check(self.batch_size >= 1, "batch_size", f">= 1, got {self.batch_size}")
        _check(0 < self.num_cpus_per_task <= 64, "num_cpus_per_task", f"0 < x <= 64, got {self.num_cpus_per_task}")
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        _check(not dupes, "sources", f"unique source names, got duplicates {dupes}")


@dataclass
class RVQConfig:
    dim: int = 32
    """Code dimension (inputs are projected to it)."""
    codebook_size: int = 256
    depth: int = 1
    """Residual depth D (DualToken uses 8; 1 = plain VQ)."""
    decay: float = 0.99
    """EMA decay of codebook statistics."""
    eps: float = 1e-5
    """Laplace smoothing of EMA cluster sizes."""
    dead_threshold: float = 0.1
    """Restart codes whose EMA usage falls below this fraction of the mean usage."""
    kmeans_init: bool = True
    """Initialise each depth's codebook by k-means on the first batch."""
    kmeans_iters: int = 10

    def __post_init__(self):
        _check(self.dim >= 1, "dim", f">= 1, got {self.dim}")
        _check(2 <= self.codebook_size <= 65536, "codebook_size", f"2..65536, got {self.codebook_size}")
        _check(1 <= self.depth <= 32, "depth", f"1..32, got {self.depth}")
        _check(0.0 < self.decay < 1.0, "decay", f"in (0, 1), got {self.decay}")


@dataclass
class VQConfig:
    channels: int = 64
    """Width of the conv trunk."""
    num_down: int = 2
    """Downsampling steps: a 64x64 image becomes a 16x16 code grid with 2."""
    res_blocks: int = 1
    """Residual blocks per resolution."""
    encoder_norm: Literal["group", "channel"] = "group"
    """Normalisation in the encoder: `group` (GroupNorm, statistics over the whole image) or `channel`
    (layer norm over each position's channels, so a patch's code does not depend on the rest of the image)."""
    encoder_padding: Literal["zeros", "replicate"] = "zeros"
    """Padding of the encoder's convolutions: `replicate` keeps a flat region flat up to the border."""
    rvq: RVQConfig = field(default_factory=RVQConfig)
    merge_tolerance: float = 1.0
    """After training, retire a code that lies within this many RMS quantisation errors of another code (the
    error measured on training images): k-means splits a flat background along its pixel noise into codes
    that decode alike, which BPE cannot merge and a generator must choose between (README "Learning",
    "Text -> image", item 10). 0 keeps every code."""

    def __post_init__(self):
        _check(self.channels % 8 == 0 and self.channels >= 8, "channels", f"a multiple of 8, got {self.channels}")
        _check(1 <= self.num_down <= 5, "num_down", f"1..5, got {self.num_down}")
        _check(self.merge_tolerance >= 0, "merge_tolerance", f">= 0, got {self.merge_tolerance}")


@dataclass
class DualConfig:
    """DualToken: a SigLIP ViT with a pixel branch (shallow layer) and a semantic branch (deep layer)."""

    siglip_path: str = ""
    """`from_pretrained` path of real SigLIP weights; empty = build from the sizes below and run `align`."""
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    patch_size: int = 8
    pixel_layer: int = 2
    """Hidden state feeding the pixel branch (DualToken: 6 of 27)."""
    shortcut_layer: int = 1
    """Earlier hidden state added to the pixel features (0 = none)."""
    semantic_layer: int = 4
    """Hidden state feeding the semantic branch (DualToken: 26)."""
    decoder_channels: int = 64
    pixel_rvq: RVQConfig = field(default_factory=lambda: RVQConfig(dim=32, codebook_size=256, depth=4))
    semantic_rvq: RVQConfig = field(default_factory=lambda: RVQConfig(dim=32, codebook_size=256, depth=4))
    align_steps: int = 300
    """SigLIP sigmoid-loss pre-training steps of the ViT on image-text pairs (skipped with real weights)."""
    align_lr: float = 1e-3

    def __post_init__(self):
        _check(self.hidden_size % self.num_heads == 0, "hidden_size", f"divisible by num_heads={self.num_heads}, got {self.hidden_size}")
        _check(1 <= self.pixel_layer <= self.num_layers, "pixel_layer", f"1..num_layers={self.num_layers}, got {self.pixel_layer}")
        _check(0 <= self.shortcut_layer < self.pixel_layer, "shortcut_layer", f"0..pixel_layer-1, got {self.shortcut_layer}")
        _check(1 <= self.semantic_layer <= self.num_layers, "semantic_layer", f"1..num_layers={self.num_layers}, got {self.semantic_layer}")
        _check(self.patch_size in (2, 4, 8, 16, 32), "patch_size", f"a power of two 2..32, got {self.patch_size}")


@dataclass
class LossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    lpips_weight: float = 1.0
    """DualToken: 1."""
    commitment_weight: float = 5.0
    """DualToken: 5 (on the RVQ commitment loss)."""
    semantic_mse_weight: float = 5.0
    """DualToken: 5 (semantic branch, dual preset only)."""
    semantic_cos_weight: float = 1.0
    gan_weight: float = 0.75
    """Scale of the adaptive adversarial weight (DualToken: 0.75)."""
    gan_weight_min: float = 0.3
    gan_weight_max: float = 10.0
    disc_start: int = 2000
    """Steps before the discriminator and adversarial loss start (warm-up)."""
    disc_channels: int = 32
    disc_layers: int = 2


@dataclass
class TokenizerTrainConfig:
    steps: int = 1500
    batch_size: int = 32
    """Global batch, split across Ray Train workers."""
    lr: float = 2e-3
    disc_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    num_workers: int = 1
    """Ray Train workers (DDP)."""
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    """One GPU per worker, bf16 autocast."""
    checkpoint_every: int = 250
    max_failures: int = 1
    heldout_images: int = 48
    """Held-out images for PSNR/SSIM/LPIPS and the reconstruction PNG."""

    def __post_init__(self):
        _check(self.steps >= 1, "steps", f">= 1, got {self.steps}")
        _check(self.batch_size >= self.num_workers, "batch_size", f">= num_workers, got {self.batch_size}")
        _check(self.num_workers >= 1, "num_workers", f">= 1, got {self.num_workers}")
        _check(self.cpus_per_worker > 0, "cpus_per_worker", f"> 0, got {self.cpus_per_worker}")


@dataclass
class TokenizerConfig:
    preset: Literal["vq", "dual", "oracle"] = "vq"
    """vq | dual (DualToken) | oracle: the shapes world's objects read from the pixels, one code per
    3x3 cell (no weights; the learning study's ceiling, see tessera/tokenize/oracle.py)."""
    output: str = "{root}/tokenizer"
    image_size: int = 64
    oracle_grid: int = 3
    """The oracle's code grid: 3 = one code per cell; G > 3 paints each object's code over the cells of
    a G x G grid its box covers (the oracle's content in the real tokens' geometry: 16 = the demo's VQ grid)."""
    vq: VQConfig = field(default_factory=VQConfig)
    dual: DualConfig = field(default_factory=DualConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)

    def __post_init__(self):
        _check(self.image_size % (2 ** self.vq.num_down) == 0, "image_size", f"divisible by 2**vq.num_down, got {self.image_size}")
        _check(self.image_size % self.dual.patch_size == 0, "image_size", f"divisible by dual.patch_size, got {self.image_size}")
        _check(3 <= self.oracle_grid <= self.image_size, "oracle_grid", f"between 3 and image_size, got {self.oracle_grid}")


@dataclass
class TokenizeConfig:
    output: str = "{root}/tokens"
    tokenizer: str = ""
    """Directory of the trained visual tokenizer; empty = `tokenizer.output`."""
    text_tokenizer: str = ""
    """`from_pretrained` path of the base LLM's tokenizer; empty = train a byte-level BPE on the prepared texts."""
    text_vocab_size: int = 2048
    """Vocabulary of the trained text tokenizer (ignored with `text_tokenizer`)."""
    num_actors: int = 1
    """Size of the tokenizer actor pool (one GPU each on a cluster)."""
    num_gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    batch_size: int = 32
    """Samples per actor call."""
    encode_batch: int = 16
    """Images per forward pass; the last chunk is padded, so every image meets the same kernels
    whatever the pool size (tokens identical for 1 or N actors)."""
    rows_per_shard: int = 256
    features: bool = False
    """Also store each image's pre-quantisation encoder features (`pixel_features`, float32 h*w*dim per
    image; vq preset): what the `continuous` model interface reads. Off by default: they are ~dim times
    the size of the codes."""

    def __post_init__(self):
        _check(self.num_actors >= 1, "num_actors", f">= 1, got {self.num_actors}")
        _check(self.batch_size >= 1 and self.encode_batch >= 1, "batch_size", "batch_size and encode_batch >= 1")
        _check(self.text_vocab_size >= 300, "text_vocab_size", f">= 300 (bytes + merges), got {self.text_vocab_size}")
        _check(self.cpus_per_actor > 0, "cpus_per_actor", f"> 0, got {self.cpus_per_actor}")


@dataclass
class BPEConfig:
    output: str = "{root}/bpe"
    tokens: str = ""
    """Output directory of `tokenize` (its `tokens/` table is read); empty = `tokenize.output`."""
    tokenizer: str = ""
    """Visual tokenizer used to render the frequent-tiles PNG; empty = `tokenizer.output`, `none` = no PNG."""
    codebook: Literal["pixel", "semantic"] = "pixel"
    depth: int = 0
    """Which RVQ depth's codes the BPE runs on."""
    num_merges: int = 1024
    alpha: float = 0.0
    """Weight of spatial consistency in the merge priority (0 = pure frequency)."""
    top_k: int = 32
    min_frequency: int = 2
    max_tile: tuple[int, int] = (4, 4)
    num_workers: int = 1
    """Ray actors holding corpus shards (1 = in-process)."""
    checkpoint_every: int = 256
    heldout_every: int = 10
    """Every n-th sample (by a stable hash of its id) is held out to measure vocabulary usage."""
    png_tiles: int = 32

    def __post_init__(self):
        _check(self.num_merges >= 0, "num_merges", f">= 0, got {self.num_merges}")
        _check(self.alpha >= 0, "alpha", f">= 0, got {self.alpha}")
        _check(self.top_k >= 1, "top_k", f">= 1, got {self.top_k}")
        _check(self.min_frequency >= 1, "min_frequency", f">= 1, got {self.min_frequency}")
        _check(1 <= min(self.max_tile) and max(self.max_tile) <= 16, "max_tile", f"(h, w) in 1..16, got {self.max_tile}")
        _check(self.depth >= 0, "depth", f">= 0, got {self.depth}")
        _check(self.num_workers >= 1, "num_workers", f">= 1, got {self.num_workers}")
        _check(self.heldout_every >= 2, "heldout_every", f">= 2, got {self.heldout_every}")


@dataclass
class DepthHeadConfig:
    """DualToken's depth transformer: predicts the RVQ codes of one cell, depth by depth."""

    layers: int = 3
    heads: int = 4
    dim: int = 128


@dataclass
class GridEncoderConfig:
    """bpe interface: a small CNN over the base-code grid of every image the model reads, its feature
    added to each tile's input embedding (`tessera.model.grid_encoder`). `layers: 0` = off. `layers: 1,
    kernel: 1` reads no neighbour: each tile gets an embedding composed from its own base codes, shared by
    every tile that holds them (measured in README "Learning": no gain that two seeds agree on)."""

    layers: int = 0
    dim: int = 64
    kernel: int = 3


@dataclass
class ModelConfig:
    """The unified autoregressive model (DESIGN.md "The unified model")."""

    pretrained: str = ""
    """`from_pretrained` path of the base causal LM (e.g. a Qwen2.5 checkpoint); empty = a tiny
    model built from the fields below."""
    arch: Literal["qwen2"] = "qwen2"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 352
    max_position: int = 4096
    rope_theta: float = 10000.0
    interface: Literal["bpe", "rvq", "continuous"] = "bpe"
    """`bpe`: one token per visual-BPE tile (Being-VL); `rvq`: one position per grid cell with
    depth-transformer heads (DualToken / Kelix); `continuous`: the raw code tokens (one per grid cell,
    the targets), each one's input embedding a projector over the tokenizer encoder's
    pre-quantisation feature of its cell instead of the code's row (the continuous baseline of
    Kelix's question; needs `tokenize.features: true`; it cannot generate images: a generated code
    has no feature)."""
    codebooks: list[str] = field(default_factory=lambda: ["pixel"])
    """rvq interface: which of the tokenizer's codebooks a cell carries (`pixel`, `semantic`)."""
    depth_head: DepthHeadConfig = field(default_factory=DepthHeadConfig)
    visual_positions: Literal["1d", "2d", "extent"] = "2d"
    """`2d`: each visual token (a BPE tile, an rvq cell) also gets learned row and column
    embeddings of its anchor cell added to its input embedding, so the LM knows where in the
    image it sits (a raster index of variable-size tiles does not say). `extent` (bpe interface):
    the mean of those row embeddings over the rows its tile covers plus the mean of the column
    embeddings over its columns, so a tile is placed by the cells it covers, not by its top-left
    corner (a 1x1 tile gets exactly its `2d` embedding). `1d`: sequence positions only (the `bpe`
    model then loads with plain `transformers`)."""
    next_cell: bool = False
    """Each position also gets learned row and column embeddings of the cell the *next* visual token
    will be anchored at (the first free cell of the grid, a function of the tiles before it; none
    after an image's last tile), added to its input embedding. A position predicts the next token,
    so this says where the tile it emits goes; without it the LM must work out the next free cell of
    a raster of variable-size tiles itself (README "Learning", "Text -> image")."""
    grid_encoder: GridEncoderConfig = field(default_factory=GridEncoderConfig)
    init: Literal["mean", "he"] = "mean"
    """New embedding rows: mean of the existing rows plus noise, or He (Being-VL)."""
    init_noise: float = 0.02
    mot: bool = False
    """Mixture-of-Transformers (BAGEL): visual positions get their own FFN expert per layer."""
    mot_attention: bool = False
    """With `mot`, also separate q/k/v/o projections and norms per modality."""
    max_grid: int = 64
    """Largest grid side with a shape token."""
    time_tokens: int = 64
    time_step: float = 0.5
    """Video frame timestamps are tokens `<t=k>`, k = round(seconds / time_step), clipped to time_tokens - 1."""
    tokenizer: str = ""
    """Visual tokenizer directory; empty = `tokenizer.output`."""
    text_tokenizer: str = ""
    """Text tokenizer; empty = `tokenize.text_tokenizer`, or the one `tokenize` trained (`<tokenize.output>/text_tokenizer`)."""
    bpe: str = ""
    """Visual BPE merges; empty = `<bpe.output>/merges.json`."""
    question_first: str = ""
    """A regular expression: the questions it finds are read before their image, not after it.
    Training moves each such turn of an independent-turn conversation into a sample of its own
    (question, image, answer) and evaluation prompts it the same way. Under causal attention an
    image read after the question is encoded *for* it: each visual token can match itself against
    "a red circle" on its way up, where an answer after the image must find and bind colour to
    shape across ~100 tiles at one position. Measured on the demo's existence questions with its
    from-scratch LM, it learns them far more slowly (README "Learning"). Empty: every image comes first."""

    def __post_init__(self):
        _check(self.hidden_size % self.num_heads == 0, "hidden_size", f"divisible by num_heads ({self.num_heads}), got {self.hidden_size}")
        _check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", f"dividing num_heads ({self.num_heads}), got {self.num_kv_heads}")
        _check(self.num_layers >= 1, "num_layers", f">= 1, got {self.num_layers}")
        _check(bool(self.codebooks) and all(c in ("pixel", "semantic") for c in self.codebooks), "model.codebooks",
               f"a non-empty list of 'pixel'/'semantic', got {self.codebooks}")
        _check(not self.mot_attention or self.mot, "mot_attention", "requires model.mot: true")
        _check(self.depth_head.dim % self.depth_head.heads == 0, "depth_head.dim", "divisible by depth_head.heads")
        _check(self.time_step > 0 and self.time_tokens >= 1, "time_step", "time_step > 0 and time_tokens >= 1")
        if self.question_first:
            try:
                re.compile(self.question_first)
            except re.error as e:
                _check(False, "model.question_first", f"a regular expression, got {self.question_first!r} ({e})")


@dataclass
class TrainableLayers:
    layers: list[int] = field(default_factory=list)


@dataclass
class MixtureConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"all": 1.0})
    """Selector -> weight. A selector is `all` or a tag `key=value` matched against the sample's
    curriculum tags plus `source=<name>` and `kind=<kind>` (e.g. `task=vqa`, `difficulty=easy`)."""
    order: Literal["random", "curriculum"] = "random"
    """`curriculum`: the stage's samples run easy -> medium -> hard."""


@dataclass
class StageConfig:
    name: str
    steps: int
    trainable: Union[Literal["embeddings", "new", "all"], TrainableLayers] = "all"
    """`embeddings`: only the new vocabulary rows (and the rvq interface); `new`: those plus the MoT
    visual experts (BAGEL's alignment of the new parts); `{layers: [..]}`: those decoder layers
    plus embeddings; `all`."""
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    batch_size: int = 8
    """Packed rows per optimizer step, over all workers (split evenly; times grad_accum micro-steps)."""
    seq_len: int = 512
    loss_mask: Literal["all", "text", "image", "answers"] = "all"
    """Which targets carry loss: everything, text only, image tokens only, or assistant answers
    (captions count as answers for samples without roles)."""
    t2i_rate: Optional[float] = None
    """This stage's share of image-text pairs shown caption-first (their image tokens become
    targets under `answers`); None = `train.t2i_rate`. Understanding stages set 0 so the loss
    stays on text answers; a generation stage raises it."""
    image_loss_weight: Optional[float] = None
    """None: the loss is one mean over the step's targets, so in a stage that mixes caption-first pairs
    (~100 image targets each) with answers (a few text targets) the image tiles take nearly all of it.
    A number w: the mean over the step's text targets plus w times the mean over its image targets (a
    modality with no targets in the step adds nothing), so a generation stage can rehearse answers."""
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    questions: Optional[str] = None
    """A regular expression over question text: in conversations of independent questions (documents
    whose meta says `"turns": "independent"`, as the shapes world's VQA) only the turns whose question
    it finds are kept, and a conversation with none is left out; other samples are unchanged. A
    curriculum phase on one kind of question (the demo's `shape` stage); None keeps every turn."""
    questions_rate: float = 1.0
    """Share of the conversations `questions` reduces (drawn by sample id); the others keep every turn, so
    a phase can dwell on one kind of question without forgetting the rest."""

    def __post_init__(self):
        _check(self.steps >= 1, "steps", f">= 1, got {self.steps}")
        if self.questions is not None:
            try:
                re.compile(self.questions)
            except re.error as e:
                _check(False, "questions", f"a regular expression, got {self.questions!r} ({e})")
        _check(0.0 < self.questions_rate <= 1.0, "questions_rate",
               f"a share in (0, 1], got {self.questions_rate}")
        _check(self.lr > 0, "lr", f"> 0, got {self.lr}")
        _check(self.seq_len >= 16, "seq_len", f">= 16, got {self.seq_len}")
        _check(self.image_loss_weight is None or self.image_loss_weight >= 0, "image_loss_weight",
               f"a weight >= 0 or null, got {self.image_loss_weight}")
        _check(self.t2i_rate is None or 0.0 <= self.t2i_rate <= 1.0, "t2i_rate",
               f"a share in [0, 1] or null, got {self.t2i_rate}")
        _check(bool(self.mixture.weights) and all(w >= 0 for w in self.mixture.weights.values()) and sum(self.mixture.weights.values()) > 0,
               "mixture.weights", f"non-negative weights with a positive sum, got {self.mixture.weights}")
        for sel in self.mixture.weights:
            _check(sel == "all" or "=" in sel, f"mixture.weights.{sel}", "'all' or a 'key=value' tag")


def default_stages() -> list[StageConfig]:
    """Being-VL's three stages, sized for the shapes world."""
    return [
        StageConfig(name="embeddings", steps=60, trainable="embeddings", lr=3e-3, loss_mask="all",
                    mixture=MixtureConfig({"kind=image_text": 1.0})),
        StageConfig(name="layers", steps=60, trainable=TrainableLayers([0, 1]), lr=2e-3, loss_mask="all",
                    mixture=MixtureConfig({"kind=image_text": 0.6, "task=vqa": 0.2, "kind=video": 0.1, "source=shapes_web": 0.1})),
        StageConfig(name="all", steps=60, trainable="all", lr=1e-3, loss_mask="answers",
                    mixture=MixtureConfig({"kind=image_text": 0.4, "task=vqa": 0.6})),
    ]


@dataclass
class TrainConfig:
    """`tessera train`: the staged curriculum on Ray Train (DESIGN.md "Training curriculum")."""

    output: str = "{root}/train"
    tokens: str = ""
    """Output directory of `tokenize`; empty = `tokenize.output`."""
    storage_path: str = "{root}/ray_train"
    """Ray Train `RunConfig.storage_path` (a URI every node reaches on a cluster)."""
    stages: list[StageConfig] = field(default_factory=default_stages)
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """`fsdp`: FSDP2 (`fully_shard` per decoder layer), for GPU clusters."""
    grad_accum: int = 1
    grad_clip: float = 1.0
    weight_decay: float = 0.01
    checkpoint_every: int = 25
    num_to_keep: int = 2
    max_failures: int = 1
    t2i_rate: float = 0.5
    """Share of image-text pairs presented caption-first (text -> image), the rest image-first."""
    cfg_text_dropout: float = 0.1
    """Classifier-free guidance: share of caption-first pairs whose caption is dropped (BAGEL: 0.1)."""
    pack_group: int = 64
    """Samples packed together; packing never crosses a group, so a data position is (group, row)."""
    log_every: int = 5
    probe_every: int = 0
    """Every this many steps of a stage (and at its end), rank 0 answers `probe_questions` held-out
    questions per type (from `eval.heldout`) greedily and logs the accuracy per type beside the
    loss, so a run shows when grounding appears. 0 = off."""
    probe_questions: int = 30
    seed: int = -1
    """Seed of model init, data order and sequence draws; -1 = run.seed (ablations vary this alone)."""

    def effective_seed(self, run_seed: int) -> int:
        return run_seed if self.seed < 0 else self.seed

    def t2i_rate_of(self, stage: "StageConfig") -> float:
        """A stage's caption-first rate: its own, else `train.t2i_rate`."""
        return self.t2i_rate if stage.t2i_rate is None else stage.t2i_rate

    def __post_init__(self):
        _check(bool(self.stages), "stages", "at least one stage")
        names = [s.name for s in self.stages]
        _check(len(set(names)) == len(names), "stages", f"unique stage names, got {names}")
        _check(self.num_workers >= 1, "num_workers", f">= 1, got {self.num_workers}")
        _check(self.cpus_per_worker > 0, "cpus_per_worker", f"> 0, got {self.cpus_per_worker}")
        _check(self.grad_accum >= 1, "grad_accum", f">= 1, got {self.grad_accum}")
        _check(0 <= self.t2i_rate <= 1, "t2i_rate", f"0..1, got {self.t2i_rate}")
        _check(0 <= self.cfg_text_dropout <= 1, "cfg_text_dropout", f"0..1, got {self.cfg_text_dropout}")
        _check(self.checkpoint_every >= 1, "checkpoint_every", f">= 1, got {self.checkpoint_every}")
        _check(self.pack_group >= 1, "pack_group", f">= 1, got {self.pack_group}")
        for i, s in enumerate(self.stages):
            _check(s.batch_size % (self.num_workers * self.grad_accum) == 0, f"train.stages[{i}].batch_size",
                   f"a multiple of num_workers * grad_accum ({self.num_workers * self.grad_accum}), got {s.batch_size}")


@dataclass
class EvalSetConfig:
    """A held-out set in a published format (see `tessera.model.eval_sets`)."""

    name: str
    kind: Literal["pope", "vqa", "captions"]
    uri: str
    """The set's .jsonl (or JSON array) file."""
    image_folder: str = ""
    """Where its `image` paths are resolved; empty = the file's folder."""
    limit: int = 0
    """Rows scored (0 = all)."""

    def __post_init__(self):
        _check(bool(self.name) and "/" not in self.name, "name", f"a non-empty name without '/', got {self.name!r}")
        _check(self.limit >= 0, "limit", f">= 0, got {self.limit}")


GENERATION_CHOOSERS = ("caption", "drawing")
"""How best-of-n text -> image keeps one of a caption's drawings (`EvalConfig.generation_chooser`)."""


@dataclass
class EvalConfig:
    """`tessera eval`: the held-out shapes-world suite (when its held-out set exists) and every set of `sets`."""

    output: str = "{root}/eval"
    model: str = ""
    """The model evaluated; empty = `<train.output>/model`."""
    heldout: str = ""
    """Held-out scenes and questions (scenes.jsonl, questions.jsonl, images/); empty = <synth.output>/heldout."""
    num_captions: int = 0
    """Held-out images captioned (0 = all)."""
    num_questions: int = 0
    """Held-out questions asked (0 = all)."""
    num_generate: int = 16
    """Held-out captions turned into images."""
    cfg_scale: float = 3.0
    temperature: float = 0.7
    top_k: int = 0
    seed: int = 0
    generation_candidates: int = 1
    """Best-of-n text -> image: each caption drawn n times, the model keeping the drawing its
    `generation_chooser` picks (`Evaluator.generation`). 1 = one sample.
    The report also gives one sample's score over all n (`generation_accuracy_single`)."""
    generation_chooser: str = "caption"
    """Which of the n drawings best-of-n keeps (`Evaluator.choice_score`; the analyser never chooses).
    `caption`: the one under which the model finds the caption most likely (it captions its own drawings).
    `drawing`: the one the model finds most likely given the caption (the likelihood of the drawing's
    tokens, re-encoded from its pixels, after the caption)."""
    sets: list[EvalSetConfig] = field(default_factory=list)
    """Held-out sets in published formats, each scored into report.json under `eval.sets.<name>`."""

    def __post_init__(self):
        names = [s.name for s in self.sets]
        _check(len(names) == len(set(names)), "sets", f"unique set names, got {names}")
        for key in ("num_captions", "num_questions", "num_generate"):
            _check(getattr(self, key) >= 0, key, f">= 0, got {getattr(self, key)}")
        _check(self.generation_candidates >= 1, "generation_candidates", f">= 1 (1 = one sample), got {self.generation_candidates}")
        _check(self.generation_chooser in GENERATION_CHOOSERS, "generation_chooser",
               f"one of {list(GENERATION_CHOOSERS)}, got {self.generation_chooser!r}")
        _check(self.cfg_scale >= 1.0, "cfg_scale", f">= 1 (1 = no guidance), got {self.cfg_scale}")
        _check(self.temperature >= 0, "temperature", f">= 0 (0 = greedy), got {self.temperature}")


@dataclass
class AblationArm:
    name: str
    set: list[str] = field(default_factory=list)
    """`key=value` overrides of this arm (as `--set`)."""


@dataclass
class AblationStudy:
    name: str
    arms: list[AblationArm]
    question: str = ""
    seeds: list[int] = field(default_factory=list)
    """This study's seeds; empty = `ablate.seeds` (a third seed where two disagree on the direction)."""


@dataclass
class AblateConfig:
    """`tessera ablate`: studies of arms that differ only by their overrides; same data and
    compute budget per arm (every arm trains the same stages scaled by `steps_scale`)."""

    output: str = "{root}/ablations"
    seeds: list[int] = field(default_factory=lambda: [0])
    steps_scale: float = 1.0
    studies: list[AblationStudy] = field(default_factory=list)

    def __post_init__(self):
        _check(bool(self.seeds), "seeds", "at least one seed")
        _check(0 < self.steps_scale <= 10, "steps_scale", f"0 < x <= 10, got {self.steps_scale}")
        for i, st in enumerate(self.studies):
            names = [a.name for a in st.arms]
            _check(len(names) == len(set(names)) and names, f"studies[{i}].arms", f"unique, non-empty arm names, got {names}")
            for j, arm in enumerate(st.arms):
                # every arm reads the same samples: an arm may not move or rebuild the shared data
                shared = [o for o in arm.set if o.split(".", 1)[0].split("=", 1)[0] in ("run", "synth", "prepare", "ablate")]
                _check(not shared, f"studies[{i}].arms[{j}].set",
                       f"run.*, synth.*, prepare.* and ablate.* are shared by every arm (same data), got {shared}")


@dataclass
class TesseraConfig:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    bpe: BPEConfig = field(default_factory=BPEConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)

    def __post_init__(self):
        self.derive_inputs()

    def check_sections_agree(self) -> None:
        """Checks across sections, for a whole config a user wrote (a saved model's `model` section
        alone is a valid config too, so these are not in `__post_init__`)."""
        _check(not self.tokenize.features or self.tokenizer.preset == "vq", "tokenize.features",
               f"pre-quantisation features come from the vq tokenizer, not tokenizer.preset {self.tokenizer.preset!r}")
        _check(self.model.interface != "continuous" or self.tokenize.features, "model.interface",
               "`continuous` reads the encoder's features: set tokenize.features: true")
        _check(self.model.visual_positions != "extent" or self.model.interface == "bpe", "model.visual_positions",
               f"`extent` places BPE tiles by the cells they cover: it needs model.interface bpe, not {self.model.interface!r}")
        _check(self.model.grid_encoder.layers == 0 or self.model.interface == "bpe", "model.grid_encoder.layers",
               f"the grid encoder reads BPE tiles' codes: it needs model.interface bpe, not {self.model.interface!r}")

    def derive_inputs(self) -> None:
        """Every job's input defaults to its producer's output, here and only here: change
        `tokenizer.output` and every consumer follows. A location set explicitly is kept."""
        derived = {
            ("tokenize", "tokenizer"): self.tokenizer.output,
            ("bpe", "tokens"): self.tokenize.output,
            ("bpe", "tokenizer"): self.tokenizer.output,
            ("model", "tokenizer"): self.tokenizer.output,
            ("model", "text_tokenizer"): self.tokenize.text_tokenizer or f"{self.tokenize.output}/text_tokenizer",
            ("model", "bpe"): f"{self.bpe.output}/merges.json",
            ("train", "tokens"): self.tokenize.output,
            ("eval", "model"): f"{self.train.output}/model",
            ("eval", "heldout"): f"{self.synth.output}/heldout",
        }
        for (section, key), value in derived.items():
            if not getattr(getattr(self, section), key):
                setattr(getattr(self, section), key, value)
        if not self.prepare.sources:
            self.prepare.sources = default_sources(self.synth.output)

    def resolve(self, location: str) -> str:
        """Expand `{root}` in a location."""
        return location.replace("{root}", self.run.root)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_fingerprint(self, *sections: str) -> str:
        """Stable hash of the named sections (plus run.root), for skip/resume decisions."""
        payload = {s: dataclasses.asdict(getattr(self, s)) for s in sections}
        payload["root"] = self.run.root
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def default_sources(synth_output: str) -> list[SourceConfig]:
    """The shapes world's sources, as written by `tessera synth` in published layouts (img2dataset, a
    saved HF dataset, videos with .srt/.vtt, OBELICS-style jsonl documents, LLaVA conversations)."""
    return [
        SourceConfig(name="shapes_wds", kind="img2dataset", uri=f"{synth_output}/wds", caption_key="txt", image_key="jpg"),
        SourceConfig(name="shapes_hf", kind="hf_dataset", uri=f"{synth_output}/hf", caption_key="caption", image_key="image", id_key="id"),
        SourceConfig(name="shapes_video", kind="video", uri=f"{synth_output}/video"),
        SourceConfig(name="shapes_web", kind="web", uri=f"{synth_output}/web"),
        SourceConfig(name="shapes_instruct", kind="llava", uri=f"{synth_output}/instruct/llava_vqa.json",
                     image_folder=f"{synth_output}/instruct"),
    ]


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and build dataclasses; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(key, f"expected a list of {len(args)} items, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        k_tp, v_tp = typing.get_args(tp)
        return {_convert(k, k_tp, key): _convert(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp in (int, str, bool):
        # bool is an int in Python; refuse it where an int is expected and vice versa.
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(key, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(key, f"unsupported annotation {tp!r}")


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _merge_section(default: Any, override: dict) -> dict:
    """A partial section over a dataclass default: nested sections merge key by key, but every
    other value the user writes, a mapping included (e.g. a mixture's `weights`), replaces the
    default's value whole. (A deep merge here once slipped the default `weights: {all: 1.0}`
    into every stage that wrote its own mixture.)"""
    out = {k: v for k, v in dataclasses.asdict(default).items() if k not in getattr(default, "DERIVED", ())}
    for k, v in override.items():
        current = getattr(default, k, None)
        out[k] = _merge_section(current, v) if isinstance(v, dict) and dataclasses.is_dataclass(current) else v
    return out


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(where, f"unknown key; expected one of {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                # a partial section overrides the field's own defaults (e.g. dual.pixel_rvq depth 4), not the class's;
                # fields derived from others (run.root from run.name) are derived again, not copied
                value = _merge_section(default, value)
        kwargs[name] = _convert(value, hints[name], f"{prefix}.{name}" if prefix else name)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]}" if prefix else missing[0], "required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a `_check` in the section's __post_init__: its key is relative to the section
        raise e.under(prefix) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(prefix or cls.__name__, str(e)) from e


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like key.path=value")
        path, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw  # e.g. "{root}/x": not YAML, a plain string
        node = data
        parts = path.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(path, f"'{part}' is not a section")
        node[parts[-1]] = value
    return data


def _read_yaml(path: Path, seen: set) -> dict:
    """A YAML config; `extends: other.yaml` (relative to this file) is read first and this file's
    keys override it, section by section."""
    if path.resolve() in seen:
        raise ConfigError("extends", f"{path} extends itself")
    seen.add(path.resolve())
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"expected a mapping at the top of {path}, got {type(data).__name__}")
    base = data.pop("extends", None)
    if base is None:
        return data
    base_path = path.parent / str(base)
    if not base_path.exists():
        raise ConfigError("extends", f"file not found: {base_path}")
    return _deep_merge(_read_yaml(base_path, seen), data)


def config_from_dict(data: dict) -> TesseraConfig:
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"expected a mapping at the top of the config, got {type(data).__name__}")
    return _build(TesseraConfig, data, "")


def read_config_file(path: Optional[str | Path]) -> dict:
    """The YAML mapping of `path` with its `extends` chain merged ({} when `path` is None), not yet
    validated: a snapshot that later edits of the file cannot change (an ablation builds every arm
    from the one it read at its start)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.exists():
        raise ConfigError("--config", f"file not found: {p}")
    return _read_yaml(p, set())


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                snapshot: Optional[dict] = None) -> TesseraConfig:
    """Read YAML (or defaults when `path` is None), apply overrides, validate. `snapshot`: the mapping
    `read_config_file(path)` returned earlier, used instead of reading the file again."""
    data = copy.deepcopy(snapshot) if snapshot is not None else read_config_file(path)
    data = apply_overrides(data, overrides or [])
    cfg = config_from_dict(data)
    cfg.check_sections_agree()
    return cfg
