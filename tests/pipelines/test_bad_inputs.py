"""Inputs written by someone else: every file of a source is a sample or a reject with a true reason,
and the reason says what is wrong (the per-batch functions of `pipelines/samples.py`, Ray-free)."""

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from tessera.config import PrepareConfig, SourceConfig, VideoConfig
from tessera.pipelines import samples, shapes, synth, video


def encode(path, codec, frames, fps=8):
    """A clip in any container PyAV writes (the published corpora are not all MP4)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def frames():
    scene = shapes.sample_scene(np.random.default_rng(0), num_objects=1)
    return [shapes.render_scene(scene, 32, offsets=[(i / 15, 0.0)]) for i in range(16)]


def counts(row):
    """(images, texts) of a normalised row: aligned lists, None where the other kind sits."""
    return sum(i is not None for i in row["images"]), sum(t is not None for t in row["texts"])


def test_every_file_of_a_video_directory_is_read_or_rejected(tmp_path, frames):
    subs = {"subtitles": [{"start": 0.0, "end": 1.0, "text": "A red circle moves."}]}
    synth.write_mp4(str(tmp_path / "a.mp4"), frames, fps=8)
    encode(tmp_path / "b.webm", "libvpx-vp9", frames)
    encode(tmp_path / "c.mkv", "mpeg4", frames)
    encode(tmp_path / "d.mov", "mpeg4", frames)
    encode(tmp_path / "e.avi", "mpeg4", frames)
    (tmp_path / "notes.txt").write_text("not a video")
    for stem in "abcde":
        (tmp_path / f"{stem}.json").write_text(json.dumps(subs))
    source = SourceConfig(name="v", kind="video", uri=str(tmp_path))
    files = video.source_files(str(tmp_path))
    assert sorted(f.rsplit("/", 1)[-1] for f in files) == ["a.mp4", "b.webm", "c.mkv", "d.mov", "e.avi", "notes.txt"], \
        "every file but the subtitle sidecars is an input"
    table = pa.table({"bytes": [open(f, "rb").read() for f in files], "path": files})
    cfg = PrepareConfig(video=VideoConfig(target_fps=4.0, max_frames=4))
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in
            [dict(row, path=p) for row, p in zip(samples.video_batch(table, source, cfg).to_pylist(), files)]}
    for name in ("a.mp4", "b.webm", "c.mkv", "d.mov", "e.avi"):
        assert rows[name]["reject_reason"] is None, (name, rows[name]["reject_detail"])
        assert counts(rows[name]) == (4, 1)
    assert rows["notes.txt"]["reject_reason"] == "unsupported_format"
    assert ".txt" in rows["notes.txt"]["reject_detail"] and "webm" in rows["notes.txt"]["reject_detail"]


def test_a_sidecar_with_other_fields_says_which_fields_it_has(tmp_path, frames):
    synth.write_mp4(str(tmp_path / "good.mp4"), frames, fps=8)
    (tmp_path / "good.json").write_text(json.dumps({"captions": [{"start": 0.0, "text": "A red circle."}]}))
    files = video.source_files(str(tmp_path))
    table = pa.table({"bytes": [open(f, "rb").read() for f in files], "path": files})
    cfg = PrepareConfig(video=VideoConfig(target_fps=4.0, max_frames=4, require_text=True))
    (row,) = samples.video_batch(table, SourceConfig(name="v", kind="video", uri=str(tmp_path)), cfg).to_pylist()
    assert row["reject_reason"] == "malformed_document"
    assert "good.json" in row["reject_detail"] and "['captions']" in row["reject_detail"] and "'subtitles'" in row["reject_detail"]


def test_decord_says_nothing_on_the_console_about_a_broken_file(capfd):
    from tessera.pipelines.images import Rejected

    for _ in range(3):
        with pytest.raises(Rejected) as e:
            video.decode_clip(b"\x00\x01garbage" * 40, VideoConfig())
        assert e.value.reason == "video_undecodable"
    out, err = capfd.readouterr()
    assert "not a video" not in out + err and err.strip() == "", "the reason is in the reject's detail, not on the console"


def wds_members(**members):
    """One webdataset row as `read_webdataset(decoder=None)` yields it: `__key__` + a bytes column per extension."""
    return pa.table({k: [v] for k, v in members.items()})


def png_bytes():
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_webdataset_image_under_another_extension_is_read_and_none_at_all_is_named():
    source = SourceConfig(name="w", kind="webdataset", uri="x", caption_key="txt", image_key="jpg")
    cfg = PrepareConfig()
    (png,) = samples.webdataset_batch(wds_members(__key__="k1", png=png_bytes(), txt=b"A grey square."), source, cfg).to_pylist()
    assert png["reject_reason"] is None and counts(png) == (1, 1)
    (none,) = samples.webdataset_batch(wds_members(__key__="k2", txt=b"A grey square.", cls=b"3"), source, cfg).to_pylist()
    assert none["reject_reason"] == "missing_image"
    assert "k2" in none["reject_detail"] and "['cls', 'txt']" in none["reject_detail"] and "jpg" in none["reject_detail"]
    (empty,) = samples.webdataset_batch(wds_members(__key__="k3", jpg=b"", txt=b"A grey square."), source, cfg).to_pylist()
    assert empty["reject_reason"] == "empty_file", "a member that is there but empty keeps its own reason"
