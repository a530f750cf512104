import base64
import json

import pytest

from tessera.pipelines import documents
from tessera.pipelines.images import Rejected


@pytest.mark.parametrize("ref", ["../x.png", "a/../../x.png", "/etc/passwd", "\\\\server\\x", "C:\\x.png", "s3://b/x.png", "~/x.png", ".", ".."])
def test_paths_escaping_the_root_are_unsafe(ref):
    with pytest.raises(Rejected) as e:
        documents.safe_relative_path(ref)
    assert e.value.reason == "unsafe_path"


@pytest.mark.parametrize("ref, norm", [("images/a.png", "images/a.png"), ("a/../b.png", "b.png"), ("./c/d.png", "c/d.png")])
def test_relative_paths_inside_the_root_are_allowed(ref, norm):
    assert documents.safe_relative_path(ref) == norm


@pytest.mark.parametrize(
    "line",
    [
        '{"id": "x", "texts": [',
        "[1, 2]",
        json.dumps({"texts": ["a"], "images": [None, "x.png"]}),
        json.dumps({"texts": ["a", "b"], "images": [None, None]}),
        json.dumps({"texts": ["a", None], "images": ["x.png", "y.png"]}),
        json.dumps({"texts": ["only text"], "images": [None]}),
        json.dumps({"texts": "a", "images": []}),
        json.dumps({"texts": [3, None], "images": [None, "x.png"]}),
    ],
)
def test_malformed_documents(line):
    with pytest.raises(Rejected) as e:
        documents.parse_document(line)
    assert e.value.reason == "malformed_document"


def test_image_refs_resolve_inside_the_root(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"PNGDATA")
    assert documents.load_image_ref("images/a.png", str(tmp_path)) == b"PNGDATA"
    assert documents.load_image_ref("data:image/png;base64," + base64.b64encode(b"xyz").decode(), str(tmp_path)) == b"xyz"
    for ref, reason in [("images/b.png", "missing_file"), ("data:image/png;base64,@@@", "malformed_document"), ("../a.png", "unsafe_path")]:
        with pytest.raises(Rejected) as e:
            documents.load_image_ref(ref, str(tmp_path))
        assert e.value.reason == reason
