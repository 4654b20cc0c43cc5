import numpy as np
import pytest

from hashtag import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_round_trip(root):
    storage.write_json(storage.join(root, "a", "m.json"), {"x": 1, "tag": "東京"})
    assert storage.read_json(storage.join(root, "a", "m.json")) == {"x": 1, "tag": "東京"}
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    storage.save_npy(storage.join(root, "a", "x.npy"), array)
    np.testing.assert_array_equal(storage.load_npy(storage.join(root, "a", "x.npy")), array)
    assert storage.listdir(storage.join(root, "a")) == ["m.json", "x.npy"]
    assert storage.exists(storage.join(root, "a", "x.npy"))
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "x.npy"))
    assert storage.listdir(storage.join(root, "missing")) == []


def test_object_arrays_are_refused(tmp_path):
    with pytest.raises(TypeError, match="pickle"):
        storage.save_npy(str(tmp_path / "o.npy"), np.array([{"a": 1}], dtype=object))


def test_local_write_leaves_no_temporary_files(tmp_path):
    storage.write_bytes(str(tmp_path / "f.bin"), b"abc")
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
