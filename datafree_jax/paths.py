"""The one path layer: every file the project writes, reads or checks goes through here.

Paths are strings: local paths, or URLs such as gs://bucket/run that etils.epath opens (orbax
uses the same layer for checkpoints). Local paths are made absolute; URLs are kept as given.
"""
from __future__ import annotations

import os
import posixpath
import uuid

from etils import epath


def is_remote(path) -> bool:
  """Whether `path` is a URL (gs://, s3://, ...) rather than a local path."""
  return "://" in os.fspath(path)


def resolve(path) -> str:
  """`path` as an absolute local path, or the URL as given (without a trailing slash)."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/")
  return os.path.abspath(path)


def join(path, *parts) -> str:
  path = os.fspath(path)
  if is_remote(path):
    return posixpath.join(path, *parts)
  return os.path.join(path, *parts)


def parent(path) -> str:
  path = resolve(path)
  if is_remote(path):
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest)}" if "/" in rest else path
  return os.path.dirname(path)


def Path(path) -> epath.Path:  # pylint: disable=invalid-name
  return epath.Path(resolve(path))


def exists(path) -> bool:
  return Path(path).exists()


def isdir(path) -> bool:
  return Path(path).is_dir()


def listdir(path) -> list:
  """Names of the entries of directory `path`."""
  return sorted(p.name for p in Path(path).iterdir())


def makedirs(path) -> None:
  Path(path).mkdir(parents=True, exist_ok=True)


def write_text(path, text: str) -> None:
  makedirs(parent(path))
  Path(path).write_text(text)


def write_bytes(path, data: bytes) -> None:
  makedirs(parent(path))
  Path(path).write_bytes(data)


def read_bytes(path) -> bytes:
  return Path(path).read_bytes()


def copy(src, dst) -> None:
  """Copies file `src` to `dst` (either may be remote), replacing `dst`."""
  write_bytes(dst, read_bytes(src))


def writable(directory) -> bool:
  """Whether a file can be created in existing `directory`: tried, then removed (permission
  bits do not tell for root, read-only mounts, ACLs or bucket permissions)."""
  probe = Path(directory) / f".datafree_jax_probe_{uuid.uuid4().hex}"
  try:
    probe.write_text("")
    probe.unlink()
    return True
  except (OSError, PermissionError):
    return False
  except Exception:  # pylint: disable=broad-except  (a remote store's own errors)
    return False


def copy_tree(src: str, dst) -> None:
  """Copies local file or directory `src` to `dst` (may be remote), replacing what is there."""
  if os.path.isdir(src):
    remove(dst)
    for root, _, files in os.walk(src):
      for name in files:
        local = os.path.join(root, name)
        copy(local, join(dst, *os.path.relpath(local, src).split(os.sep)))
  else:
    copy(src, dst)


def remove(path) -> None:
  """Removes file or directory `path` (with its contents) when it exists."""
  p = Path(path)
  if p.is_dir():
    p.rmtree()
  elif p.exists():
    p.unlink()
