"""Video clips: decord decoding, frame sampling at a target fps, subtitle alignment.

A clip becomes one interleaved sample: positions in time order, each subtitle placed
just before the first sampled frame it overlaps (so the text a viewer read while a
frame was on screen precedes it), with `timestamps` for every position.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile

import numpy as np

from tessera import storage
from tessera.config import VideoConfig
from tessera.console import redirected
from tessera.pipelines import subtitles
from tessera.pipelines.images import Rejected


def sample_indices(num_frames: int, fps: float, target_fps: float, max_frames: int) -> np.ndarray:
    """Frame indices at `target_fps` from t=0, at most `max_frames`. (N,) int64."""
    if num_frames <= 0 or fps <= 0:
        return np.zeros(0, dtype=np.int64)
    duration = num_frames / fps
    times = np.arange(0.0, duration, 1.0 / target_fps)[:max_frames]
    return np.unique(np.minimum(np.round(times * fps).astype(np.int64), num_frames - 1))


VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
"""Containers a `video` source reads (decord decodes them all through FFmpeg)."""


def source_files(uri: str) -> list[str]:
    """Every input file of a video source: all files under `uri` except the subtitle sidecars
    (`.srt`, `.vtt`, `.json`), whatever their extension, so none disappears (a file that is not a
    readable video becomes a reject, `unsupported_format`, instead of being skipped)."""
    return [f for f in storage.list_files(uri, "", recursive=True) if f.rsplit(".", 1)[-1].lower() not in subtitles.EXTENSIONS]


def subtitle_sidecar(video_uri: str) -> str | None:
    """The subtitle file beside a video (`<stem>.srt`, else `.vtt`, else `.json`), or None."""
    stem = video_uri.rsplit(".", 1)[0]
    for ext in subtitles.EXTENSIONS:
        if storage.exists(f"{stem}.{ext}"):
            return f"{stem}.{ext}"
    return None


def check_container(path: str) -> None:
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext not in VIDEO_EXTENSIONS:
        raise Rejected("unsupported_format", f"'.{ext}' is not a video container this source reads ({', '.join(VIDEO_EXTENSIONS)})")


def decode_clip(data: bytes, cfg: VideoConfig, start: float = 0.0, end: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Video bytes (any of VIDEO_EXTENSIONS) -> (frames uint8 (N, H, W, 3), timestamps float64 (N,)
    seconds from the start of the file), frames sampled in [start, end) (a CSV manifest's clip; None =
    to the end). Raises Rejected, whose detail is the only place a broken file is described: FFmpeg's
    own messages ("this is not a video", one per file) are silenced."""
    import decord

    decord.logging.set_level(decord.logging.QUIET)

    if not data:
        raise Rejected("video_undecodable", "video has 0 bytes")
    try:
        with _native_stderr_captured():
            # one thread per reader: parallelism comes from Ray, not from oversubscribing cores
            reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
            n = len(reader)
            fps = float(reader.get_avg_fps())
            first = int(round(start * fps)) if fps > 0 else 0
            last = min(n, int(round(end * fps))) if end is not None and fps > 0 else n
            if first >= n or last <= first:
                raise Rejected("video_undecodable", f"clip [{start}, {end}) s is outside the video ({n} frames at {fps:.2f} fps)")
            idx = first + sample_indices(last - first, fps, cfg.target_fps, cfg.max_frames)
            if len(idx) == 0:
                raise Rejected("video_undecodable", f"no frames (frames={n}, fps={fps})")
            frames = reader.get_batch(idx.tolist()).asnumpy()
    except Rejected:
        raise
    except Exception as e:  # decord raises DECORDError / RuntimeError for broken streams
        raise Rejected("video_undecodable", f"{type(e).__name__}: {str(e)[:300]}") from e
    return frames, idx / fps


@contextlib.contextmanager
def _native_stderr_captured():
    """decord's C++ logger writes each failure to file descriptor 2 as well as into the exception it
    raises (whose text becomes the reject's detail); keep that copy off the console (one line per bad
    file otherwise). A decode runs on its task's one thread, so the brief redirect catches only it."""
    with tempfile.TemporaryFile() as sink, redirected(2, sink.fileno()):
        yield


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
