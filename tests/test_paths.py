"""paths: local paths made absolute, URLs kept; the file operations on a local directory (the
gs:// side runs against an emulator in test_gcs.py)."""
import os

import pytest

from datafree_jax import paths


@pytest.mark.parametrize("path,remote,resolved,parent", [
    ("gs://b/run/", True, "gs://b/run", "gs://b"),
    ("gs://b/run/teacher", True, "gs://b/run/teacher", "gs://b/run"),
    ("gs://b", True, "gs://b", "gs://b"),
    ("runs/x", False, os.path.abspath("runs/x"), os.path.abspath("runs")),
    ("/tmp/y/", False, "/tmp/y", "/tmp"),
])
def test_resolve_and_parent(path, remote, resolved, parent):
  assert paths.is_remote(path) is remote
  assert paths.resolve(path) == resolved
  assert paths.parent(path) == parent


def test_join_uses_slashes_for_urls():
  assert paths.join("gs://b/run", "samples", "a.png") == "gs://b/run/samples/a.png"
  assert paths.join("/tmp", "a") == os.path.join("/tmp", "a")


def test_file_operations_on_a_local_directory(tmp_path):
  target = str(tmp_path / "a" / "b" / "c.txt")
  paths.write_text(target, "hi")  # creates the parents
  assert paths.read_bytes(target) == b"hi" and paths.exists(target)
  paths.copy(target, str(tmp_path / "d" / "e.txt"))
  assert paths.listdir(tmp_path) == ["a", "d"] and paths.isdir(str(tmp_path / "d"))
  assert paths.writable(str(tmp_path)) and paths.listdir(tmp_path) == ["a", "d"]  # no probe left
  assert not paths.writable(target)  # a file is no directory to write in
