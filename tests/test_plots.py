"""<workdir>/plots/*.png: drawn at the end of every run from the TensorBoard scalars and sample
grids (datafree_jax/plots.py); reading is tested apart from drawing, and plotting never fails
a run."""
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import copy_stages, ensemble_config

PLOTS = ("accuracy.png", "generator_losses.png", "samples_over_time.png")


def _image(path) -> np.ndarray:
  with open(path, "rb") as f:
    return np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))


def _assert_drawn(path, min_h=100, min_w=200):
  """A real figure: big enough and not blank."""
  img = _image(path)
  assert img.shape[0] >= min_h and img.shape[1] >= min_w, (path, img.shape)
  assert img.std() > 5, path  # curves, text and axes on white, not an empty canvas
  assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10, path


@pytest.fixture(scope="module")
def pipeline_workdir(bn_teacher_workdir, generators_workdir, tmp_path_factory):
  """(workdir, summary): the shared generators run (teacher + generators, with the teacher's
  TensorBoard events too) continued with stage=distill, the student evaluated every 10 of 20
  steps."""
  from datafree_jax import pipeline  # pylint: disable=g-import-not-at-top
  src, _ = generators_workdir
  workdir = copy_stages(src, tmp_path_factory.mktemp("plots_run"), "teacher", "generators",
                        "tensorboard", "samples")
  shutil.copytree(os.path.join(bn_teacher_workdir, "tensorboard"),
                  os.path.join(workdir, "tensorboard"), dirs_exist_ok=True)
  summary = pipeline.train_and_evaluate(
      ensemble_config(stage="distill", **{"student.eval_every": 10}), workdir)
  return workdir, summary


def test_run_writes_the_three_plots(pipeline_workdir):
  from datafree_jax import pipeline  # pylint: disable=g-import-not-at-top
  workdir, summary = pipeline_workdir
  expected = [os.path.join(workdir, "plots", name) for name in PLOTS]
  assert summary["plots"] == expected
  text = pipeline._summary_text(summary)  # pylint: disable=protected-access
  assert all(f"  {p}" in text for p in expected)
  _assert_drawn(expected[0])
  _assert_drawn(expected[1], min_w=500)   # one panel per loss term, side by side
  # Two evaluations of the generators (steps 2 and 4): two rows of ten 28x28 samples at scale
  # 2 with their label strips, stacked.
  strip = _image(expected[2])
  assert strip.shape[1] > 10 * 56 and strip.shape[0] > 2 * (56 + 12)
  _assert_drawn(expected[2])


def test_scalars_of_the_run(pipeline_workdir):
  """The data the figures are drawn from: one curve per stage, with the right points."""
  from datafree_jax import plots  # pylint: disable=g-import-not-at-top
  workdir, summary = pipeline_workdir
  scalars = plots.read_workdir_scalars(workdir)
  assert set(scalars) == {"teacher", "generators", "distill_generators"}
  acc = plots.accuracy_curves(scalars)
  assert set(acc) == {"teacher", "distill_generators"}   # the generators have no accuracy
  # The teacher (10 steps, eval_every 0) is evaluated once, at its end; the student at 10, 20.
  np.testing.assert_array_equal(acc["teacher"][0], [10])
  np.testing.assert_array_equal(acc["distill_generators"][0], [10, 20])
  assert acc["distill_generators"][1][-1] == pytest.approx(summary["student"]["test_accuracy"])
  assert acc["teacher"][1][-1] == pytest.approx(summary["teacher"]["test_accuracy"])
  losses = plots.generator_loss_curves(scalars)
  assert list(losses) == ["generators"]
  assert list(losses["generators"]) == ["loss", "ce", "l2", "mm", "tv"]
  for steps, values in losses["generators"].values():
    np.testing.assert_array_equal(steps, [4])   # 4 steps: scalars at the last one
    assert np.all(np.isfinite(values))
  grids = plots.sample_grids(workdir)
  assert [s for s, _ in grids["generators"]] == [2, 4]


def test_stage_tags_resume_and_old_tags(tmp_path):
  """Stages sharing one writer keep their curves apart (stage-prefixed tags); a step written
  again (a resumed stage) keeps its latest value; tags without a stage are skipped."""
  from datafree_jax import log, plots  # pylint: disable=g-import-not-at-top
  logdir = str(tmp_path / "tb")
  w = log.LazyWriter(logdir)
  w.write_scalars(10, {"teacher/eval/accuracy": 0.5, "eval/accuracy": 0.1})
  w.write_scalars(20, {"teacher/eval/accuracy": 0.75})
  w.write_scalars(10, {"dafl/eval/accuracy": 0.25, "dafl/train/loss_g": -1.0,
                       "dafl/train/loss_kd": 0.5, "dafl/train/grad_norm_g": 3.0})
  w.flush()
  w.write_scalars(10, {"dafl/eval/accuracy": 0.3})    # resumed at step 10
  w.write_images(10, {"samples/dafl": np.zeros((1, 4, 4, 3), np.uint8)})
  assert w.local_dir == logdir
  w.close()
  scalars = plots.read_scalars(logdir)
  assert set(scalars) == {"teacher", "dafl"}
  acc = plots.accuracy_curves(scalars)
  np.testing.assert_array_equal(acc["teacher"][0], [10, 20])
  np.testing.assert_allclose(acc["teacher"][1], [0.5, 0.75])
  np.testing.assert_allclose(acc["dafl"][1], [0.3])
  assert list(plots.generator_loss_curves(scalars)["dafl"]) == ["loss_g"]
  # An event file still being written (its last record cut short) reads up to that record.
  (event_file,) = [f for f in os.listdir(logdir) if "tfevents" in f]
  with open(os.path.join(logdir, event_file), "rb") as f:
    data = f.read()
  cut = tmp_path / "cut"
  cut.mkdir()
  (cut / event_file).write_bytes(data[:-7])
  assert plots.accuracy_curves(plots.read_scalars(str(cut)))["teacher"][0].tolist() == [10, 20]


def test_scalar_events_keep_wall_times_and_rewritten_steps(tmp_path):
  """scalar_events: every event of one tag per stage, in writing order, with the time it was
  written (between the clock readings around the write), a resumed step kept twice."""
  import time  # pylint: disable=g-import-not-at-top
  from datafree_jax import log, plots  # pylint: disable=g-import-not-at-top
  logdir = str(tmp_path / "tb")
  w = log.LazyWriter(logdir)
  t0 = time.time()
  w.write_scalars(10, {"teacher/eval/accuracy": 0.5, "distill/train/loss": 2.0})
  w.flush()
  time.sleep(0.05)
  t1 = time.time()
  w.write_scalars(20, {"distill/eval/accuracy": 0.9})
  w.write_scalars(20, {"distill/eval/accuracy": 0.95})     # resumed at step 20
  w.close()
  t2 = time.time()
  events = plots.scalar_events(logdir)
  assert set(events) == {"teacher", "distill"}
  ((wall, step, acc),) = events["teacher"]
  assert (step, acc) == (10, 0.5) and t0 - 1e-3 <= wall <= t1
  assert [(s, round(a, 6)) for _, s, a in events["distill"]] == [(20, 0.9), (20, 0.95)]
  assert all(t1 - 1e-3 <= t <= t2 for t, _, _ in events["distill"])
  ((wall, step, loss),) = plots.scalar_events(logdir, "train/loss")["distill"]
  assert (step, loss) == (10, 2.0) and t0 - 1e-3 <= wall <= t1


def test_remote_workdir(tmp_path, monkeypatch):
  """A remote workdir: the writer stages events locally (local_dir) and copies them; the plots
  read them back through the path layer and write through it (a fake:// store here)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from datafree_jax import log, paths, plots  # pylint: disable=g-import-not-at-top
  store = tmp_path / "store"
  monkeypatch.setattr(paths, "Path", lambda p: epath.Path(
      str(p).replace("fake://", str(store) + "/")))
  workdir = "fake://bucket/run"
  w = log.LazyWriter(paths.join(workdir, "tensorboard"))
  assert w.local_dir is None
  w.write_scalars(5, {"teacher/eval/accuracy": 0.5})
  staging = w.local_dir
  assert staging and os.path.isdir(staging) and not staging.startswith(str(store))
  w.write_scalars(9, {"teacher/eval/accuracy": 0.9})
  w.close()
  assert w.local_dir is None and not os.path.exists(staging)
  written = plots.write_plots(workdir)
  assert written == ["fake://bucket/run/plots/accuracy.png"]
  _assert_drawn(store / "bucket" / "run" / "plots" / "accuracy.png")
  np.testing.assert_array_equal(
      plots.accuracy_curves(plots.read_workdir_scalars(workdir))["teacher"][0], [5, 9])


def test_broken_inputs_only_warn(pipeline_workdir, tmp_path, capsys, monkeypatch):
  from datafree_jax import plots  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "broken"
  (workdir / "tensorboard").mkdir(parents=True)
  (workdir / "tensorboard" / "events.out.tfevents.1.host.2.v2").write_bytes(
      b"\x00garbage" * 100)
  (workdir / "samples").mkdir()
  (workdir / "samples" / "generators_step000002.png").write_bytes(b"not a png")
  assert plots.write_plots(str(workdir)) == []
  err = capsys.readouterr().err
  assert "warning: plots: could not read the TensorBoard scalars" in err and "corrupt" in err
  assert "could not draw samples_over_time.png" in err
  # An event dir that is not there, and a drawing that fails: warnings; the rest is drawn.
  assert plots.write_plots(str(workdir), event_dir=str(tmp_path / "nowhere")) == []
  assert "could not read the TensorBoard scalars" in capsys.readouterr().err

  def fail(*a):
    raise RuntimeError("no canvas")
  monkeypatch.setattr(plots, "accuracy_figure", fail)
  out = tmp_path / "copy"
  shutil.copytree(pipeline_workdir[0], out)
  written = plots.write_plots(str(out))
  assert [os.path.basename(p) for p in written] == list(PLOTS[1:])
  assert "could not draw accuracy.png: RuntimeError: no canvas" in capsys.readouterr().err


def test_first_row_of_a_grid():
  """The strip's rows are cut from the sample grids: the first row of cells without the row
  titles, also when a line of the images is the padding's grey."""
  from datafree_jax import plots, visualize  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(0).random((30, 8, 8, 1), np.float32)
  images[:, 3] = visualize.BACKGROUND / 255
  grid = visualize.sample_grid(images, np.arange(30) % 10, 0.0, 1.0, ncols=10, scale=2,
                               row_titles=["G0", "G1", "G2"])
  row = plots.first_row(grid)
  assert row.shape[0] == 8 * 2 + visualize.LABEL_H
  assert row.shape[1] == 10 * 16 + 11 * visualize.PAD
  np.testing.assert_array_equal(row[:, visualize.PAD:visualize.PAD + 16][:16],
                                plots.first_row(visualize.sample_grid(
                                    images[:1], None, 0.0, 1.0, scale=2))[:16, 2:18])
