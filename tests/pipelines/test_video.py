import numpy as np
import pytest

from tessera.config import VideoConfig
from tessera.pipelines import shapes, synth, video
from tessera.pipelines.images import Rejected


def test_sample_indices_follow_the_target_fps_and_cap():
    assert video.sample_indices(24, 8.0, 2.0, 10).tolist() == [0, 4, 8, 12, 16, 20]
    assert video.sample_indices(24, 8.0, 2.0, 3).tolist() == [0, 4, 8]
    assert video.sample_indices(100, 25.0, 1.0, 2).tolist() == [0, 25]
    assert video.sample_indices(0, 25.0, 1.0, 2).tolist() == []


def test_interleave_puts_each_subtitle_before_its_first_frame():
    subs = [{"start": 1.2, "text": "b"}, {"start": 0.0, "text": "a"}, {"start": 9.0, "text": "late"}, {"start": 0.5, "text": " "}]
    order = video.interleave(np.array([0.0, 1.0, 2.0]), subs)
    assert [(k, v) for k, _, v in order] == [("text", "a"), ("image", 0), ("image", 1), ("text", "b"), ("image", 2), ("text", "late")]
    assert [t for _, t, _ in order] == sorted(t for _, t, _ in order)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    scene = shapes.sample_scene(np.random.default_rng(0), num_objects=1)
    frames = [shapes.render_scene(scene, 32, offsets=[(i / 15, 0.0)]) for i in range(16)]
    synth.write_mp4(str(path), frames, fps=8)
    return path.read_bytes(), frames


def test_decord_decodes_the_sampled_frames(clip):
    data, frames = clip
    out, times = video.decode_clip(data, VideoConfig(target_fps=4.0, max_frames=10))
    assert out.shape == (8, 32, 32, 3)  # 16 frames at 8 fps = 2 s, sampled at 4 fps
    assert np.allclose(times, np.arange(8) * 0.25)
    capped, _ = video.decode_clip(data, VideoConfig(target_fps=4.0, max_frames=3))
    assert len(capped) == 3
    # H.264 at crf 18: decoded frames are close to what was encoded
    assert np.abs(out[1].astype(int) - frames[2].astype(int)).mean() < 8


@pytest.mark.parametrize("cut", [0, 100, 2])
def test_truncated_video_is_rejected(clip, cut):
    data, _ = clip
    broken = b"" if cut == 0 else data[: len(data) // cut] if cut == 2 else data[:cut]
    with pytest.raises(Rejected) as e:
        video.decode_clip(broken, VideoConfig())
    assert e.value.reason == "video_undecodable"
