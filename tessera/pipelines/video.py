"""Video clips: decord decoding, frame sampling at a target fps, subtitle alignment.

A clip becomes one interleaved sample: positions in time order, each subtitle placed
just before the first sampled frame it overlaps (so the text a viewer read while a
frame was on screen precedes it), with `timestamps` for every position.
"""

from __future__ import annotations

import io

import numpy as np

from tessera.config import VideoConfig
from tessera.pipelines.images import Rejected


def sample_indices(num_frames: int, fps: float, target_fps: float, max_frames: int) -> np.ndarray:
    """Frame indices at `target_fps` from t=0, at most `max_frames`. (N,) int64."""
    if num_frames <= 0 or fps <= 0:
        return np.zeros(0, dtype=np.int64)
    duration = num_frames / fps
    times = np.arange(0.0, duration, 1.0 / target_fps)[:max_frames]
    return np.unique(np.minimum(np.round(times * fps).astype(np.int64), num_frames - 1))


def decode_clip(data: bytes, cfg: VideoConfig) -> tuple[np.ndarray, np.ndarray]:
    """MP4 bytes -> (frames uint8 (N, H, W, 3), timestamps float64 (N,) seconds). Raises Rejected."""
    import decord

    if not data:
        raise Rejected("video_undecodable", "video has 0 bytes")
    try:
        # one thread per reader: parallelism comes from Ray, not from oversubscribing cores
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        n = len(reader)
        fps = float(reader.get_avg_fps())
        idx = sample_indices(n, fps, cfg.target_fps, cfg.max_frames)
        if len(idx) == 0:
            raise Rejected("video_undecodable", f"no frames (frames={n}, fps={fps})")
        frames = reader.get_batch(idx.tolist()).asnumpy()
    except Rejected:
        raise
    except Exception as e:  # decord raises DECORDError / RuntimeError for broken streams
        raise Rejected("video_undecodable", f"{type(e).__name__}: {str(e)[:300]}") from e
    return frames, idx / fps


def interleave(frame_times: np.ndarray, subtitles: list[dict]) -> list[tuple[str, float, int | str]]:
    """Merge frames and subtitles in time order.

    Returns [(\"image\", t, frame_index) | (\"text\", t, text)]. A subtitle goes before the
    first frame with time >= its start; subtitles starting after the last frame follow it.
    """
    subs = sorted((float(s["start"]), str(s["text"])) for s in subtitles if str(s.get("text", "")).strip())
    out: list[tuple[str, float, int | str]] = []
    j = 0
    for i, t in enumerate(frame_times):
        while j < len(subs) and subs[j][0] <= t + 1e-6:
            out.append(("text", subs[j][0], subs[j][1]))
            j += 1
        out.append(("image", float(t), i))
    for start, text in subs[j:]:
        out.append(("text", start, text))
    return out
