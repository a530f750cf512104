"""Write the shapes world in the source formats users actually have.

Layout under the output location:

    wds/00000.tar              img2dataset output: <key>.jpg, <key>.txt (caption), <key>.json (img2dataset's
    wds/00000.parquet          fields + the scene), the shard's parquet (every row with its `status`, the
    wds/00000_stats.json       failed downloads only there) and its stats
    hf/                        a Hugging Face `datasets` dataset (save_to_disk): id, image, caption, scene
    video/clip-0000.mp4        H.264 MP4 of moving shapes, + clip-0000.srt or .vtt (timed subtitles)
    web/docs-00000.jsonl       OBELICS-style documents: aligned `texts`/`images` lists; an image is a
    web/images/*.png           path relative to the .jsonl file or an embedded data: URI
    instruct/llava_vqa.json    LLaVA-style question/answer conversations about training scenes (+ `task`,
    instruct/images/*.png      `turns`), images relative to instruct/
    heldout/images/*.png       held-out scenes, + scenes.jsonl (truth) and questions.jsonl, and the same
    heldout/{pope,vqa,captions}.jsonl   questions in POPE's, VQA's and a caption set's published layout
    manifest.json              counts and the config fingerprint (written last: the completion mark)

With `inject_faults`, bad inputs of every kind `prepare` must survive are added, plus
good-but-awkward images (palette, RGBA, CMYK, 16-bit, greyscale, EXIF-rotated).
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib
from fractions import Fraction

import numpy as np
from PIL import Image

from tessera import storage
from tessera.pipelines import shapes

# Distinct random streams so adding samples of one kind never changes another.
_STREAM_IMAGE, _STREAM_VIDEO, _STREAM_WEB, _STREAM_HELDOUT, _STREAM_INSTRUCT, _STREAM_PROBES = 1, 2, 3, 4, 5, 6


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def encode_image(arr: np.ndarray | Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def world(cfg) -> dict:
    """The `SynthConfig` fields every scene is drawn with (`shapes.sample_scene`'s keyword arguments): a scene `style`."""
    return {"backgrounds": cfg.backgrounds, "snap_grid": cfg.snap_grid}


def image_text_pair(seed: int, index: int, resolution: int, style: dict | None = None) -> tuple[np.ndarray, str, dict]:
    rng = _rng(seed, _STREAM_IMAGE, index)
    scene = shapes.sample_scene(rng, **(style or {}))
    return shapes.render_scene(scene, resolution), shapes.caption(scene, rng), scene.to_dict()


# ----------------------------------------------------------------------------- awkward and bad inputs


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header declares a huge image (a decompression bomb) but whose data is tiny."""
    small = encode_image(np.zeros((4, 4), np.uint8))
    ihdr_data = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr_data
    ihdr = struct.pack(">I", len(ihdr_data)) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    # signature (8) + original IHDR (25) replaced by ours
    return small[:8] + ihdr + small[33:]


def awkward_images(rgb: np.ndarray) -> dict[str, bytes]:
    """Good images in awkward encodings; `prepare` must normalise each to the same RGB content."""
    img = Image.fromarray(rgb)
    out = {
        "palette_png": encode_image(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)),
        "rgba_png": encode_image(img.convert("RGBA")),
        "cmyk_jpeg": encode_image(img.convert("CMYK"), "JPEG", quality=95),
        "grey_jpeg": encode_image(img.convert("L"), "JPEG", quality=95),
        "grey16_png": encode_image(Image.fromarray((np.asarray(img.convert("L")).astype(np.uint16) * 257))),
    }
    # Stored rotated by 90 degrees with EXIF orientation 6 ("rotate 90 CW to display").
    rotated = img.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    out["exif_rotated_jpeg"] = encode_image(rotated, "JPEG", quality=95, exif=exif.tobytes())
    return out


# ----------------------------------------------------------------------------- writers


def write_webdataset(out: str, cfg, seed: int, indices: range, faults: bool) -> int:
    """img2dataset's webdataset output: {shard}.tar (successful downloads only), {shard}.parquet
    (every row with its `status`; with faults, failed downloads appear only here) and
    {shard}_stats.json. Returns the rows written (tar samples + failed rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    os.makedirs(out, exist_ok=True)
    rows = []
    for i in indices:
        arr, cap, scene = image_text_pair(seed, i, cfg.resolution, world(cfg))
        key = f"img-{i:06d}"
        meta = {"url": f"https://shapes.example/img/{key}.jpg", "key": key, "status": "success", "error_message": None,
                "width": cfg.resolution, "height": cfg.resolution, "original_width": cfg.resolution,
                "original_height": cfg.resolution, "caption": cap, "scene": scene}
        rows.append({"__key__": key, "jpg": encode_image(arr, "JPEG", quality=95), "txt": cap, "json": json.dumps(meta).encode()})
    failed = []
    if faults and rows:
        base_rgb, base_cap, _ = image_text_pair(seed, indices[0], cfg.resolution, world(cfg))
        for name, data in awkward_images(base_rgb).items():
            rows.append({"__key__": f"ok-{name}", "jpg": data, "txt": f"{base_cap} ({name})"})
        good = rows[0]["jpg"]
        rows += [
            {"__key__": "bad-empty", "jpg": b"", "txt": "an empty file"},
            {"__key__": "bad-truncated", "jpg": good[: len(good) // 3], "txt": "a truncated jpeg"},
            {"__key__": "bad-garbage", "jpg": b"this is not an image at all", "txt": "garbage bytes"},
            {"__key__": "bad-nocaption", "jpg": good},
            {"__key__": "bad-bomb", "jpg": png_bomb(), "txt": "a decompression bomb"},
            {"__key__": "bad-tiny", "jpg": encode_image(np.zeros((8, 8, 3), np.uint8), "JPEG"), "txt": "a tiny image"},
            {"__key__": "bad-aspect", "jpg": encode_image(np.zeros((20, 200, 3), np.uint8), "JPEG"), "txt": "a very wide image"},
            {"__key__": "bad-shortcaption", "jpg": rows[1]["jpg"] if len(rows) > 1 else good, "txt": "a"},
            # same image bytes and caption as the first sample under another key: an exact duplicate
            {"__key__": "zz-duplicate", "jpg": good, "txt": rows[0]["txt"], "json": rows[0]["json"]},
        ]
        # img2dataset writes a failed download to the parquet only, never to the tar
        failed = [{"key": "bad-download", "url": "https://shapes.example/img/gone.jpg", "caption": "a link that died",
                   "status": "failed_to_download", "error_message": "HTTP Error 404: Not Found"}]
    n_shards = 0
    for start in range(0, len(rows), cfg.samples_per_shard):
        shard = rows[start:start + cfg.samples_per_shard]
        with wds.TarWriter(os.path.join(out, f"{n_shards:05d}.tar")) as sink:
            for row in shard:
                sink.write(row)
        table = [{"key": r["__key__"], "url": f"https://shapes.example/img/{r['__key__']}.jpg", "caption": r.get("txt"),
                  "status": "success", "error_message": None} for r in shard] + (failed if n_shards == 0 else [])
        schema = pa.schema([(k, pa.string()) for k in ("key", "url", "caption", "status", "error_message")])
        pq.write_table(pa.Table.from_pylist(table, schema=schema), os.path.join(out, f"{n_shards:05d}.parquet"))
        storage.write_json(os.path.join(out, f"{n_shards:05d}_stats.json"),
                           {"count": len(table), "successes": len(shard), "failed_to_download": len(table) - len(shard)})
        n_shards += 1
    return len(rows) + len(failed)


def write_hf_dataset(out: str, cfg, seed: int, indices: range, faults: bool) -> int:
    import datasets

    ids, images, caps, scenes = [], [], [], []
    for i in indices:
        arr, cap, scene = image_text_pair(seed, i, cfg.resolution, world(cfg))
        ids.append(f"img-{i:06d}")
        images.append({"bytes": encode_image(arr), "path": None})
        caps.append(cap)
        scenes.append(json.dumps(scene))
    if faults and ids:
        ids += ["bad-nocaption", "bad-corrupt"]
        images += [images[0], {"bytes": b"\x89PNG\r\n\x1a\nbroken", "path": None}]
        caps += [None, "a corrupt png"]
        scenes += ["{}", "{}"]
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(decode=False),
                                  "caption": datasets.Value("string"), "scene": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"id": ids, "image": images, "caption": caps, "scene": scenes}, features=features)
    ds.save_to_disk(out)
    return len(ids)


def _video_script(rng: np.random.Generator, seconds: float, style: dict | None = None) -> tuple[shapes.Scene, list[tuple[float, float]], list[dict]]:
    """A scene whose objects each move one cell (or stay), and timed subtitles describing it."""
    n = int(rng.integers(1, 3))
    scene = shapes.sample_scene(rng, num_objects=n, **(style or {}))
    moves, end_objects = [], []
    starts = {shapes.POSITIONS.index(o.position) for o in scene.objects}
    taken: set[int] = set()
    for obj in scene.objects:
        cell = shapes.POSITIONS.index(obj.position)
        row, col = divmod(cell, 3)
        options = [(0, 0, "stays still")]
        options += [(1, 0, "moves right")] if col < 2 else [(-1, 0, "moves left")]
        options += [(0, 1, "moves down")] if row < 2 else [(0, -1, "moves up")]
        # never into another object's start or end cell, so frames never overlap objects
        options = [o for o in options if (row + o[1]) * 3 + col + o[0] not in (starts - {cell}) | taken]
        dx, dy, verb = options[int(rng.integers(len(options)))]
        taken.add((row + dy) * 3 + col + dx)
        moves.append((dx, dy, verb))
        end_objects.append(shapes.ShapeObject(obj.shape, obj.colour, obj.size, shapes.POSITIONS[(row + dy) * 3 + col + dx]))
    end_scene = shapes.Scene(tuple(end_objects), scene.background, scene.background2, scene.gradient, scene.noise_seed, scene.noise)
    third = seconds / 3
    subs = [{"start": 0.0, "end": round(third, 3), "text": shapes.caption(scene)}]
    motion = " and ".join(f"the {o.colour} {o.shape} {m[2]}" for o, m in zip(scene.objects, moves))
    subs.append({"start": round(third, 3), "end": round(2 * third, 3), "text": motion.capitalize() + "."})
    subs.append({"start": round(2 * third, 3), "end": round(seconds, 3), "text": "Now " + shapes.caption(end_scene)[0].lower() + shapes.caption(end_scene)[1:]})
    return scene, [(m[0], m[1]) for m in moves], subs


def write_mp4(path: str, frames: list[np.ndarray], fps: int) -> None:
    """H.264 (libx264, yuv420p) MP4 through PyAV."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_subtitles(path: str, subs: list[dict]) -> None:
    """SubRip or WebVTT (by the extension of `path`) through pysubs2: {start, end, text} in seconds."""
    import pysubs2

    events = pysubs2.SSAFile()
    for sub in subs:
        events.append(pysubs2.SSAEvent(start=int(round(sub["start"] * 1000)), end=int(round(sub["end"] * 1000)), text=sub["text"]))
    events.save(path, format_=path.rsplit(".", 1)[-1])


def write_videos(out: str, cfg, seed: int, faults: bool) -> int:
    os.makedirs(out, exist_ok=True)
    n_frames = max(2, int(round(cfg.video_seconds * cfg.video_fps)))
    written = 0
    for i in range(cfg.num_videos):
        rng = _rng(seed, _STREAM_VIDEO, i)
        scene, moves, subs = _video_script(rng, cfg.video_seconds, world(cfg))
        frames = []
        for f in range(n_frames):
            t = f / (n_frames - 1)
            frames.append(shapes.render_scene(scene, cfg.resolution, offsets=[(dx * t, dy * t) for dx, dy in moves]))
        stem = os.path.join(out, f"clip-{i:04d}")
        write_mp4(stem + ".mp4", frames, cfg.video_fps)
        write_subtitles(stem + (".srt" if i % 2 == 0 else ".vtt"), subs)  # both formats users have
        written += 1
    if faults and cfg.num_videos:
        first = os.path.join(out, "clip-0000.mp4")
        data = open(first, "rb").read()
        with open(os.path.join(out, "bad-truncated.mp4"), "wb") as f:
            f.write(data[: len(data) // 2])
        write_subtitles(os.path.join(out, "bad-truncated.srt"), [{"start": 0.0, "end": 1.0, "text": "a truncated video"}])
        with open(os.path.join(out, "bad-nosubs.mp4"), "wb") as f:
            f.write(data)  # a valid video with no subtitle sidecar
        written += 2
    return written


def write_documents(out: str, cfg, seed: int, faults: bool) -> int:
    img_dir = os.path.join(out, "images")
    os.makedirs(img_dir, exist_ok=True)
    lines = []
    for d in range(cfg.num_documents):
        rng = _rng(seed, _STREAM_WEB, d)
        n_images = int(rng.integers(2, 5))
        texts, images = [f"Document {d}: a page about shapes."], [None]
        for k in range(n_images):
            scene = shapes.sample_scene(rng, **world(cfg))
            png = encode_image(shapes.render_scene(scene, cfg.resolution))
            if rng.random() < 0.25:  # some documents embed their images
                ref = "data:image/png;base64," + base64.b64encode(png).decode()
            else:
                name = f"doc-{d:04d}-{k}.png"
                with open(os.path.join(img_dir, name), "wb") as f:
                    f.write(png)
                ref = f"images/{name}"
            describe = f"Figure {k + 1} shows " + shapes.caption(scene)[0].lower() + shapes.caption(scene)[1:]
            if rng.random() < 0.5:
                texts += [None, describe]
                images += [ref, None]
            else:
                texts += [describe, None]
                images += [None, ref]
        lines.append(json.dumps({"id": f"doc-{d:04d}", "url": f"https://shapes.example/doc/{d}", "texts": texts, "images": images}))
    if faults and cfg.num_documents:
        lines += [
            '{"id": "bad-json", "texts": ["unterminated", ',
            json.dumps({"id": "bad-escape", "texts": ["escape", None], "images": [None, "../../secret.png"]}),
            json.dumps({"id": "bad-absolute", "texts": ["absolute", None], "images": [None, "/etc/passwd"]}),
            json.dumps({"id": "bad-missing", "texts": ["missing", None], "images": [None, "images/does-not-exist.png"]}),
            json.dumps({"id": "bad-misaligned", "texts": ["a", "b"], "images": [None]}),
        ]
    with open(os.path.join(out, "docs-00000.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return len(lines)


def _scene_png(img_dir: str, name: str, rng: np.random.Generator, resolution: int, style: dict | None = None) -> shapes.Scene:
    """Sample a scene from `rng`, render it and write it as `img_dir/name` (PNG)."""
    scene = shapes.sample_scene(rng, **(style or {}))
    with open(os.path.join(img_dir, name), "wb") as f:
        f.write(encode_image(shapes.render_scene(scene, resolution)))
    return scene


def write_instructions(out: str, cfg, seed: int) -> int:
    """Visual question answering conversations about training scenes (the instruction data of
    Being-VL's later stages) in LLaVA's layout: a JSON array of {"id", "image", "conversations":
    [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...]}, images relative to
    `out`. Two fields LLaVA's loaders ignore ride along: `task` (curriculum mixtures pick `task=vqa`)
    and `turns: independent`, which says each question stands alone (as at evaluation), so training
    masks every turn from the others and no answer can be copied from another question's answer."""
    img_dir = os.path.join(out, "images")
    os.makedirs(img_dir, exist_ok=True)
    records = []
    for i in range(cfg.num_instruct):
        rng = _rng(seed, _STREAM_INSTRUCT, i)
        name = f"vqa-{i:05d}.png"
        scene = _scene_png(img_dir, name, rng, cfg.resolution, world(cfg))
        qs = shapes.questions(scene, rng, every_object=True)  # independent turns: more answers per image token
        if cfg.existence_probes == "every_object":  # their own stream: the scenes and other questions stay as they were
            qs += shapes.existence_probes(scene, _rng(seed, _STREAM_PROBES, i), shapes.existence_pairs(qs))
        conversations = []
        for k in rng.permutation(len(qs)):  # any question type may come first
            q = qs[int(k)]
            conversations += [{"from": "human", "value": ("<image>\n" if not conversations else "") + q["question"]},
                              {"from": "gpt", "value": q["answer"]}]
        records.append({"id": f"vqa-{i:05d}", "image": f"images/{name}", "conversations": conversations,
                        "task": "vqa", "turns": "independent"})
    with open(os.path.join(out, "llava_vqa.json"), "w") as f:
        json.dump(records, f)
    return len(records)


def write_heldout(out: str, cfg, seed: int) -> int:
    img_dir = os.path.join(out, "images")
    os.makedirs(img_dir, exist_ok=True)
    with open(os.path.join(out, "scenes.jsonl"), "w") as fs, open(os.path.join(out, "questions.jsonl"), "w") as fq:
        for i in range(cfg.num_heldout):
            rng = _rng(seed, _STREAM_HELDOUT, i)
            name = f"heldout-{i:04d}.png"
            scene = _scene_png(img_dir, name, rng, cfg.resolution, world(cfg))
            fs.write(json.dumps({"id": f"heldout-{i:04d}", "image": f"images/{name}", "caption": shapes.caption(scene),
                                 "scene": scene.to_dict()}) + "\n")
            for j, q in enumerate(shapes.questions(scene, rng)):
                fq.write(json.dumps({"id": f"heldout-{i:04d}-q{j}", "image": f"images/{name}", **q}) + "\n")
    write_published_heldout(out)
    return cfg.num_heldout


def write_published_heldout(out: str) -> None:
    """The held-out questions and captions again, as the field publishes such sets: POPE's jsonl
    (`question_id`, `image`, `text`, `label`) for the yes/no existence questions, VQA-style jsonl
    (`question_id`, `image`, `question`, `answers`) for the others, a caption set (`image`, `captions`);
    images relative to `out`, so `eval.sets` scores them like any user's set."""
    def read(name):
        with open(os.path.join(out, name)) as f:
            return [json.loads(line) for line in f if line.strip()]

    scenes, questions = read("scenes.jsonl"), read("questions.jsonl")
    pope = [{"question_id": i, "image": q["image"], "text": q["question"], "label": q["answer"]}
            for i, q in enumerate(q for q in questions if q["type"] == "exists")]
    vqa = [{"question_id": i, "image": q["image"], "question": q["question"], "answers": [q["answer"]],
            "question_type": q["type"]} for i, q in enumerate(q for q in questions if q["type"] != "exists")]
    caps = [{"image": s["image"], "captions": [s["caption"]]} for s in scenes]
    for name, rows in (("pope.jsonl", pope), ("vqa.jsonl", vqa), ("captions.jsonl", caps)):
        with open(os.path.join(out, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def write_world(output: str, cfg, seed: int, fingerprint: str) -> dict:
    """Write the whole world under `output` (a local path) and return counts. Idempotent:
    returns the existing manifest when one with the same fingerprint is present."""
    manifest_path = os.path.join(output, "manifest.json")
    if os.path.exists(manifest_path):
        manifest = storage.read_json(manifest_path)
        if manifest.get("fingerprint") == fingerprint:
            return manifest | {"skipped": True}
    storage.remove_tree(output)
    half = cfg.num_image_text // 2
    counts = {
        "webdataset": write_webdataset(os.path.join(output, "wds"), cfg, seed, range(0, half), cfg.inject_faults),
        "hf_dataset": write_hf_dataset(os.path.join(output, "hf"), cfg, seed, range(half, cfg.num_image_text), cfg.inject_faults),
        "video": write_videos(os.path.join(output, "video"), cfg, seed, cfg.inject_faults),
        "web": write_documents(os.path.join(output, "web"), cfg, seed, cfg.inject_faults),
        "instruct": write_instructions(os.path.join(output, "instruct"), cfg, seed),
        "heldout": write_heldout(os.path.join(output, "heldout"), cfg, seed),
    }
    manifest = {"fingerprint": fingerprint, "counts": counts, "seed": seed, "resolution": cfg.resolution}
    storage.write_json(manifest_path, manifest)
    return manifest | {"skipped": False}
