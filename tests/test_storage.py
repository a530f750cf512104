from tessera import storage


def test_with_scheme_restores_the_uri_form_of_object_store_paths():
    assert storage.with_scheme("bucket/a/x.mp4", "s3://bucket/a") == "s3://bucket/a/x.mp4"
    assert storage.with_scheme("/data/a/x.mp4", "/data/a") == "/data/a/x.mp4"
    assert storage.with_scheme("gs://bucket/x", "gs://bucket") == "gs://bucket/x"


def test_atomic_json_round_trip_and_listing(tmp_path):
    storage.write_json(str(tmp_path / "d" / "a.json"), {"k": 1})
    (tmp_path / "d" / "_hidden.json").write_text("{}")
    assert storage.read_json(str(tmp_path / "d" / "a.json")) == {"k": 1}
    assert storage.list_files(str(tmp_path / "d"), ".json") == [str(tmp_path / "d" / "a.json")]
    assert not list((tmp_path / "d").glob(".tmp-*"))
