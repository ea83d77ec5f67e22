"""launch/colab/quickstart.ipynb: committed without outputs, and run top to bottom at tiny size
(nbclient, a kernel of this Python, in a temporary working directory), as on Colab but with its
parameter cell's TINY flag set. Its tfds section, which only runs on a Colab accelerator
runtime by default, runs too, forced, on a tiny tfds 'mnist' prepared offline (where the
notebook asks tfds to download and prepare it, tfds finds it prepared)."""
import base64
import io
import json
import os
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, prepare_tiny_mnist

# The slow set (conftest.py): CI runs it as a step of its own.
pytestmark = pytest.mark.slow

NOTEBOOK = os.path.join(REPO_ROOT, "launch", "colab", "quickstart.ipynb")


def _load():
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  return nb


def _parameter_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "one code cell tagged 'parameters'"
  assert cells[0].cell_type == "code"
  return cells[0]


def test_committed_notebook_has_no_outputs():
  nb = _load()
  assert nb.nbformat == 4
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (
          f"cell {cell.get('id')} has outputs: strip them before committing")
  params = _parameter_cell(nb).source
  for knob in ("TEACHER_STEPS", "GENERATOR_STEPS", "STUDENT_STEPS", "NUM_GENERATORS", "TINY",
               "REPO_URL"):
    assert f"{knob} = " in params


def _text(output) -> str:
  if output.output_type == "stream":
    return output.text
  return "".join(output.get("data", {}).get(k, "") for k in ("text/plain", "text/html"))


def _tiny_tfds_mnist(tmp_path_factory) -> str:
  """A prepared tfds 'mnist' of 200 train / 50 test real digits (mnist5k's, 20 / 5 per class:
  the teacher's per-class BN statistics need 8 of each class at tiny size)."""
  from datafree_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  x, y = input_pipeline._mnist_raw()  # pylint: disable=protected-access
  arrays = {}
  for split, (start, n) in (("train", (0, 20)), ("test", (20, 5))):
    idx = np.concatenate([np.flatnonzero(y == k)[start:start + n] for k in range(10)])
    arrays[split] = x[idx].reshape(-1, 28, 28), y[idx].astype(np.uint8)
  return prepare_tiny_mnist(tmp_path_factory, arrays)


def test_notebook_runs_at_tiny_size(tmp_path, tmp_path_factory, monkeypatch):
  pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  nb = _load()
  data_dir = _tiny_tfds_mnist(tmp_path_factory)
  # The parameter cell as committed, then what CI sets (as papermill injects parameters).
  params = _parameter_cell(nb)
  params.source += ("\n\n# injected by tests/test_notebook.py\nTINY = True\nTENSORBOARD = False\n"
                    f"RUN_TFDS = True\nTFDS_DATA_DIR = {data_dir!r}\n")
  # A kernel of this very Python, that imports this checkout's package (the install cell then
  # installs nothing).
  kernels = tmp_path / "jupyter" / "kernels" / "datafree_test"
  kernels.mkdir(parents=True)
  (kernels / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "datafree_jax tests", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  run_dir = tmp_path / "cwd"
  run_dir.mkdir()
  NotebookClient(nb, kernel_name="datafree_test", timeout=300,
                 resources={"metadata": {"path": str(run_dir)}}).execute()

  by_id = {c.get("id"): c for c in nb.cells}
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not [o for o in cell.outputs if o.output_type == "error"], cell.get("id")
  text = {cid: "".join(_text(o) for o in c.outputs) for cid, c in by_id.items()
          if c.cell_type == "code"}
  assert "datafree_jax is installed" in text["install"]
  assert "backend: cpu" in text["devices"]
  assert "teacher step 40/40" in text["run"] and "=== done in" in text["run"]
  assert "test accuracy %" in text["table"]
  assert "teacher: lenet5_bn" in text["table"] and "student: lenet5_half_bn" in text["table"]
  assert "teacher lenet5_bn: test accuracy" in text["tfds"] and "=== done in" in text["tfds"]
  assert "tensorboard --logdir" in text["tensorboard"]

  def images(cid):
    out = []
    for o in by_id[cid].outputs:
      if "image/png" in o.get("data", {}):
        out.append(Image.open(io.BytesIO(base64.b64decode(o.data["image/png"]))))
    return out
  samples = images("samples")
  assert len(samples) == 1 and samples[0].size[0] > 10 * 56   # 10 samples per row, scale 2
  plots = images("plots")
  assert len(plots) == 3 and all(p.size[0] > 200 for p in plots)
  for workdir in (run_dir / "quickstart_run", run_dir / "quickstart_run_mnist"):
    assert sorted(os.listdir(workdir / "plots")) == [
        "accuracy.png", "generator_losses.png", "samples_over_time.png"]
  assert len(images("tfds")) == 3
