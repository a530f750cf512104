"""Small corpora laid out exactly as the public tools and datasets publish them (field names, nesting,
file naming, null conventions), each with good items and bad ones, and an HTTP server on 127.0.0.1
that serves images, 404s, slow responses and HTML. Written here by hand, not by tessera, so the
readers are checked against the published layouts rather than against our own writers.
"""

from __future__ import annotations

import collections
import io
import json
import os
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tessera.pipelines import shapes, synth


def image_bytes(colour, fmt="JPEG", size=40) -> bytes:
    arr = np.full((size, size, 3), 255, np.uint8)
    arr[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = colour
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    """A webdataset shard: members in order, grouped by key as the writers of these tools group them."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def clip_frames(n=16, size=32):
    scene = shapes.sample_scene(np.random.default_rng(0), num_objects=1)
    return [shapes.render_scene(scene, size, offsets=[(i / (n - 1), 0.0)]) for i in range(n)]


# ----------------------------------------------------------------------------- img2dataset


def img2dataset(root) -> dict:
    """`img2dataset --output_format webdataset` output: {shard}.tar, {shard}.parquet, {shard}_stats.json.
    Keys are 9 digits (shard id then index). Returns {key: expected reason or None}."""
    os.makedirs(root)
    rows, members, expected = [], [], {}
    items = [("000000000", "success", image_bytes((200, 30, 30)), "a red square"),
             ("000000001", "success", image_bytes((30, 30, 200), "PNG"), "a blue square"),
             ("000000002", "failed_to_download", None, "never fetched"),
             ("000000003", "success", b"\xff\xd8\xff garbage", "a broken jpeg"),
             ("000000004", "failed_to_resize", None, "too small")]
    for key, status, data, caption in items:
        url = f"http://images.example/{key}.jpg"
        meta = {"url": url, "caption": caption, "key": key, "status": status,
                "error_message": None if status == "success" else "HTTP Error 404: Not Found",
                "width": 40 if data else None, "height": 40 if data else None,
                "original_width": 40 if data else None, "original_height": 40 if data else None,
                "exif": None, "sha256": None}
        rows.append(meta)
        if status == "success":
            ext = "png" if data.startswith(b"\x89PNG") else "jpg"
            members += [(f"{key}.{ext}", data), (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())]
        expected[key] = {"success": None, "failed_to_download": "download_failed", "failed_to_resize": "download_failed"}[status]
    expected["000000003"] = "corrupt_image"
    write_tar(os.path.join(root, "00000.tar"), members)
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("status", pa.string()),
                        ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                        ("original_width", pa.int64()), ("original_height", pa.int64()), ("exif", pa.string()),
                        ("sha256", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(root, "00000.parquet"))
    with open(os.path.join(root, "00000_stats.json"), "w") as f:
        json.dump({"count": 5, "successes": 3, "failed_to_download": 1, "failed_to_resize": 1,
                   "status_dict": {"success": 3, "HTTP Error 404: Not Found": 2}}, f)
    return expected


# ----------------------------------------------------------------------------- LLaVA


def llava(root) -> tuple[str, dict]:
    """LLaVA-Instruct-150K layout: a JSON array `llava_instruct.json` (plus a JSONL file as ShareGPT4V's
    tools write), images under `image_folder` as `coco/train2017/{12 digits}.jpg`. Returns
    (image_folder, {id: (expected reason or None, number of images)})."""
    folder = os.path.join(root, "images")
    os.makedirs(os.path.join(folder, "coco", "train2017"))
    for name, colour in (("000000000009", (200, 30, 30)), ("000000000025", (30, 200, 30))):
        with open(os.path.join(folder, "coco", "train2017", f"{name}.jpg"), "wb") as f:
            f.write(image_bytes(colour))
    records = [
        {"id": "000000000009", "image": "coco/train2017/000000000009.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is the square?"},
                           {"from": "gpt", "value": "The square is red."},
                           {"from": "human", "value": "Is it on a white background?"},
                           {"from": "gpt", "value": "Yes, the background is white."}]},
        {"id": "text_only_1", "conversations": [{"from": "human", "value": "Name a primary colour."},
                                                {"from": "gpt", "value": "Blue is a primary colour."}]},
        {"id": "escape", "image": "../../etc/passwd.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A file."}]},
        {"id": "gone", "image": "coco/train2017/000000999999.jpg",
         "conversations": [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "Nothing."}]},
    ]
    with open(os.path.join(root, "llava_instruct.json"), "w") as f:
        json.dump(records, f)
    lines = [json.dumps({"id": 25, "image": "coco/train2017/000000000025.jpg",  # integer id, no placeholder
                         "conversations": [{"from": "human", "value": "What colour is the square?"},
                                           {"from": "gpt", "value": "It is green."}]}),
             '{"id": "broken", "conversations": [{"from": "human"']
    with open(os.path.join(root, "sharegpt4v.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return folder, {"000000000009": (None, 1), "text_only_1": (None, 0), "escape": ("unsafe_path", 0),
                    "gone": ("missing_file", 0), "25": (None, 1)}


# ----------------------------------------------------------------------------- MINT-1T


def mint1t(root) -> dict:
    """MINT-1T-style shards: per document `{key}.json` with aligned `texts` / `images` (null where the
    other is set) and its images as members `{key}.{i}.jpg`. Returns {key: (reason, interleaving)}."""
    os.makedirs(root)
    docs = {
        "doc-0000": ({"texts": ["An introduction to squares.", None, "The square above is red."],
                      "images": [None, "https://example.org/red.jpg", None], "url": "https://example.org/a"},
                     [("0.jpg", image_bytes((200, 30, 30)))]),
        "doc-0001": ({"texts": [None, "Two squares follow.", None],
                      "images": ["https://example.org/b.jpg", None, "https://example.org/c.png"], "url": "https://example.org/b"},
                     [("0.jpg", image_bytes((30, 30, 200))), ("1.png", image_bytes((30, 200, 30), "PNG"))]),
        "doc-0002": ({"texts": ["A document whose image was lost.", None], "images": [None, "https://example.org/x.jpg"]}, []),
        "doc-0003": ({"texts": ["misaligned", "lists"], "images": [None]}, [("0.jpg", image_bytes((9, 9, 9)))]),
    }
    members = []
    for key, (doc, images) in docs.items():
        members.append((f"{key}.json", json.dumps(doc).encode()))
        members += [(f"{key}.{suffix}", data) for suffix, data in images]
    write_tar(os.path.join(root, "shard-000000.tar"), members)
    return {"doc-0000": (None, ["text", "image", "text"]), "doc-0001": (None, ["image", "text", "image"]),
            "doc-0002": ("missing_file", None), "doc-0003": ("malformed_document", None)}


# ----------------------------------------------------------------------------- OBELICS


def obelics(root, base_url: str) -> list[tuple[str | None, list | None]]:
    """The HF OBELICS parquet layout: `images` (URLs, null at text positions), `metadata` (a JSON string,
    a list aligned with the positions), `general_metadata` (a JSON string), `texts` (null at image
    positions). Returns, per row, (expected reason, interleaving)."""
    os.makedirs(root)
    gm = lambda i: json.dumps({"url": f"https://news.example/{i}", "warc_filename": "crawl.warc.gz", "warc_record_offset": i})  # noqa: E731
    md = lambda n: json.dumps([None] * n)  # noqa: E731
    rows = [
        {"images": [f"{base_url}/img/red.jpg", None, f"{base_url}/img/blue.png"], "texts": [None, "Between two squares.", None]},
        {"images": [None, f"{base_url}/img/green.jpg"], "texts": ["A green square:", None]},
        {"images": [None, f"{base_url}/missing.jpg"], "texts": ["A dead link:", None]},
        {"images": [None, f"{base_url}/page.html"], "texts": ["An HTML page:", None]},
        {"images": [None, f"{base_url}/slow.jpg"], "texts": ["A slow server:", None]},
        {"images": [None, f"{base_url}/img/red.jpg"], "texts": ["Misaligned", "lists"]},
    ]
    for i, r in enumerate(rows):
        r["metadata"], r["general_metadata"] = md(len(r["texts"])), gm(i)
    schema = pa.schema([("images", pa.list_(pa.string())), ("metadata", pa.string()), ("general_metadata", pa.string()),
                        ("texts", pa.list_(pa.string()))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(root, "train-00000-of-00001.parquet"))
    return [(None, ["image", "text", "image"]), (None, ["text", "image"]), ("http_404", None), ("not_an_image", None),
            ("timeout", None), ("malformed_document", None)]


class ImageServer:
    """127.0.0.1 only: /img/<name> images, /missing.jpg 404, /page.html HTML, /slow.jpg answers after
    `slow_s`, /flaky.jpg 503. `hits[path]` counts requests."""

    def __init__(self, slow_s: float = 3.0):
        self.hits = collections.Counter()
        images = {"red.jpg": image_bytes((200, 30, 30)), "blue.png": image_bytes((30, 30, 200), "PNG"),
                  "green.jpg": image_bytes((30, 200, 30))}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.hits[self.path] += 1
                name = self.path.rsplit("/", 1)[-1]
                if self.path.startswith("/img/") and name in images:
                    return self._send(200, "image/jpeg", images[name])
                if self.path == "/page.html":
                    return self._send(200, "text/html", b"<html><body>moved</body></html>")
                if self.path == "/slow.jpg":
                    time.sleep(slow_s)
                    return self._send(200, "image/jpeg", images["red.jpg"])
                if self.path == "/flaky.jpg":
                    return self._send(503, "text/plain", b"busy")
                return self._send(404, "text/plain", b"not found")

            def _send(self, code, ctype, body):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ----------------------------------------------------------------------------- video


def video2dataset(root) -> dict:
    """video2dataset webdataset output: {key}.mp4, {key}.txt, {key}.json per clip, {shard}.parquet and
    {shard}_stats.json beside. Returns {key: expected reason}."""
    os.makedirs(root)
    mp4 = os.path.join(os.path.dirname(str(root)), "v2d-clip.mp4")
    synth.write_mp4(mp4, clip_frames(), fps=8)
    data = open(mp4, "rb").read()
    os.remove(mp4)
    meta = lambda key, caption: json.dumps({"url": f"https://videos.example/{key}.mp4", "key": key, "status": "success",  # noqa: E731
                                            "error_message": None, "caption": caption, "duration": 2.0}).encode()
    members = [("000000000.mp4", data), ("000000000.txt", b"a square slides to the right"),
               ("000000000.json", meta("000000000", "a square slides to the right")),
               ("000000001.mp4", data[: len(data) // 3]), ("000000001.txt", b"a truncated file"),
               ("000000001.json", meta("000000001", "a truncated file")),
               ("000000002.mp4", data), ("000000002.json", meta("000000002", ""))]
    write_tar(os.path.join(root, "00000.tar"), members)
    pq.write_table(pa.table({"key": ["000000000", "000000001", "000000002"], "status": ["success"] * 3}),
                   os.path.join(root, "00000.parquet"))
    with open(os.path.join(root, "00000_stats.json"), "w") as f:
        json.dump({"count": 3, "successes": 3}, f)
    return {"000000000": None, "000000001": "video_undecodable", "000000002": "missing_caption"}


def video_csv(root) -> dict:
    """A WebVid / InternVid-style CSV manifest `path,caption,start,end` beside `videos/`. Returns
    {(path, start): expected reason}."""
    os.makedirs(os.path.join(root, "videos"))
    synth.write_mp4(os.path.join(root, "videos", "v1.mp4"), clip_frames(), fps=8)
    rows = [("videos/v1.mp4", "the first second of a sliding square", "0.0", "1.0"),
            ("videos/v1.mp4", "the second second", "1.0", "2.0"),
            ("videos/v9.mp4", "a clip that is not there", "0.0", "1.0"),
            ("../outside.mp4", "a path that escapes", "", ""),
            ("videos/v1.mp4", "a window past the end", "30.0", "31.0")]
    with open(os.path.join(root, "manifest.csv"), "w") as f:
        f.write("path,caption,start,end\n")
        for r in rows:
            f.write(",".join(f'"{v}"' if " " in v else v for v in r) + "\n")
    return {("videos/v1.mp4", 0.0): None, ("videos/v1.mp4", 1.0): None, ("videos/v9.mp4", 0.0): "missing_file",
            ("../outside.mp4", None): "unsafe_path", ("videos/v1.mp4", 30.0): "video_undecodable"}


SRT = """1
00:00:00,000 --> 00:00:00,900
A <i>red</i> square appears.

2
00:00:01,000 --> 00:00:02,000
It slides to the right.
"""

VTT = """WEBVTT

NOTE written by hand

00:00.000 --> 00:00.900 align:start
A <b>blue</b> square
appears.

00:01.000 --> 00:02.000
It slides to the right.
"""


def subtitled_videos(root) -> dict:
    """Videos with `.srt` and `.vtt` subtitle files beside them (same stem). Returns {file: reason}."""
    os.makedirs(root)
    for stem in ("a", "b", "c"):
        synth.write_mp4(os.path.join(root, f"{stem}.mp4"), clip_frames(), fps=8)
    with open(os.path.join(root, "a.srt"), "w") as f:
        f.write(SRT)
    with open(os.path.join(root, "b.vtt"), "w") as f:
        f.write(VTT)
    return {"a.mp4": None, "b.mp4": None, "c.mp4": "missing_caption"}


# ----------------------------------------------------------------------------- Hugging Face parquet


def hf_parquet(root) -> int:
    """`datasets.Dataset.to_parquet` with an `Image()` feature: `{"bytes", "path"}` structs. Returns rows."""
    import datasets

    os.makedirs(os.path.join(root, "data"))
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": image_bytes(c), "path": f"{i}.jpg"} for i, c in enumerate([(200, 30, 30), (30, 30, 200)])],
         "text": ["a red square, from the hub", "a blue square, from the hub"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    ds.to_parquet(os.path.join(root, "data", "train-00000-of-00001.parquet"))
    return 2


# ----------------------------------------------------------------------------- evaluation sets


def eval_sets(root):
    """POPE, VQA and caption sets over a folder of images, as those benchmarks publish them."""
    folder = root / "val2014"
    folder.mkdir(parents=True)
    colours = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 200, 30)}
    for name, rgb in colours.items():
        (folder / f"COCO_val2014_{name}.jpg").write_bytes(image_bytes(rgb))
    pope = [{"question_id": i, "image": f"COCO_val2014_{c}.jpg", "text": f"Is there a {q} square in the image?",
             "label": "yes" if q == c else "no"} for i, (c, q) in enumerate((c, q) for c in colours for q in colours)]
    vqa = [{"question_id": i, "image": f"COCO_val2014_{c}.jpg", "question": "What colour is the square?",
            "answers": [{"answer": c, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]}
           for i, c in enumerate(colours)]
    caps = [{"image": f"COCO_val2014_{c}.jpg", "captions": [f"a {c} square", f"a {c} square on white"]} for c in colours]
    for name, rows in (("coco_pope_random.json", pope), ("vqav2_val.jsonl", vqa), ("captions_val.jsonl", caps)):
        (root / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(folder)
