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
SIDECAR_EXTENSION = "json"


def source_files(uri: str) -> list[str]:
    """Every input file of a video source: all files under `uri` except the `<stem>.json` subtitle
    sidecars, whatever their extension, so none disappears (a file that is not a readable video
    becomes a reject, `unsupported_format`, instead of being skipped)."""
    return [f for f in storage.list_files(uri, "", recursive=True) if not f.endswith("." + SIDECAR_EXTENSION)]


def check_container(path: str) -> None:
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext not in VIDEO_EXTENSIONS:
        raise Rejected("unsupported_format", f"'.{ext}' is not a video container this source reads ({', '.join(VIDEO_EXTENSIONS)})")


def read_subtitles(sidecar: dict, name: str) -> list[dict]:
    """The `subtitles` list of a sidecar, or a reject that names the fields the file does have."""
    if not isinstance(sidecar, dict) or ("subtitles" not in sidecar and sidecar):
        found = sorted(sidecar) if isinstance(sidecar, dict) else type(sidecar).__name__
        raise Rejected("malformed_document", f"subtitle sidecar {name} has fields {found}, expected 'subtitles' "
                                             "(a list of {start, end, text})")
    subs = sidecar.get("subtitles", [])
    if not isinstance(subs, list) or any(not isinstance(s, dict) or "text" not in s or "start" not in s for s in subs):
        raise Rejected("malformed_document", f"subtitle sidecar {name}: 'subtitles' must be a list of {{start, end, text}}")
    return subs


def decode_clip(data: bytes, cfg: VideoConfig) -> tuple[np.ndarray, np.ndarray]:
    """Video bytes (any of VIDEO_EXTENSIONS) -> (frames uint8 (N, H, W, 3), timestamps float64 (N,)
    seconds). Raises Rejected, whose detail is the only place a broken file is described: FFmpeg's own
    messages ("this is not a video", one per file) are silenced."""
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
            idx = sample_indices(n, fps, cfg.target_fps, cfg.max_frames)
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
