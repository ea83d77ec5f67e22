"""`python -m benchmarks.input_speed` on a tiny build (in process): the decode floor and the
project's pipeline timed, the tables, and the host-core arithmetic against hand-computed
values."""
import os

import pytest

from conftest import REPO_ROOT

pytest.importorskip("tensorflow_datasets")

# 24 small JPEGs, batches of 4 at 32 px, one short round each.
TINY = ["--images=24", "--validation_images=2", "--min_side=40", "--max_side=60",
        "--image_size=32", "--batch=4", "--warmup=1", "--seconds=0.2", "--rounds=1"]


@pytest.fixture
def input_speed(monkeypatch):
  monkeypatch.syspath_prepend(REPO_ROOT)
  from benchmarks import input_speed as module  # pylint: disable=import-outside-toplevel
  return module


def _table(text, first_column):
  """{first cell: [cells]} of the markdown table whose header starts with first_column."""
  lines = text.splitlines()
  start = lines.index(next(l for l in lines if l.startswith(f"| {first_column} |")))
  rows = {}
  for line in lines[start + 2:]:
    if not line.startswith("| "):
      break
    cells = [c.strip() for c in line.strip("|").split("|")]
    rows.setdefault(cells[0], []).append(cells)
  return rows


def test_tiny_run_times_both_pipelines(input_speed, tmp_path, capsys):  # pylint: disable=redefined-outer-name
  data_dir = str(tmp_path / "tfds")
  affinity = os.sched_getaffinity(0)
  result = input_speed.main(TINY + [f"--data_dir={data_dir}", "--cores=1"])
  out = capsys.readouterr().out
  assert "synthetic_imagenet: writing 26 JPEGs" in out
  assert result["cores"] == 1 and result["floor"] > 0 and result["project"] > 0
  assert result["ratio"] == pytest.approx(result["project"] / result["floor"])
  assert result["cpu_ratio"] == pytest.approx(
      result["project_per_cpu_second"] / result["floor_per_cpu_second"])
  speeds = _table(out, "pipeline")
  assert list(speeds) == ["(a) decode floor", "(b) project pipeline"]
  (floor,), (proj,) = speeds.values()
  assert float(proj[1].replace(",", "")) == pytest.approx(result["project"], rel=0.01, abs=1)
  assert proj[1] == proj[2]  # one core: per core = all
  assert floor[5] == floor[6] == "1.00"
  assert float(proj[4].replace(",", "")) == pytest.approx(result["project_per_cpu_second"],
                                                          rel=0.01, abs=1)
  hosts = _table(out, "host")
  assert [len(rows) for rows in hosts.values()] == [2, 1]  # H100 twice: dry run, published
  assert "command: python -m benchmarks.input_speed --images=24" in out
  assert "24 training JPEGs, sides 40..60 px" in out and "1 core(s)" in out
  assert os.path.isdir(data_dir)  # --data_dir: kept for the next run to reuse
  assert os.sched_getaffinity(0) == affinity  # --cores=1 for the benchmark only


def test_host_cores_from_the_dry_run_rate(input_speed):  # pylint: disable=redefined-outer-name
  """989 TFLOP/s x 5% / 23.9 GFLOP = 2,069 images/s per H100, 16,552 for 8; at 1,000 images/s
  per core (a) 17 cores, at 500 (b) 33; a v5p host: 4 x 960 = 3,841 images/s; published: 8 x
  3,000."""
  peak = {"H100 SXM": 989e12, "TPU v5p": 459e12}
  rows = input_speed.feeding_rows({"(a)": 1000.0, "(b)": 500.0}, 23.9, 0.05, peak, 3000.0)
  assert [r[0] for r in rows] == ["8 x H100 SXM", "TPU v5p host", "8 x H100 SXM"]
  assert [r[1] for r in rows] == ["16,552", "3,841", "24,000"]
  assert [r[3:] for r in rows] == [["17", "33"], ["4", "8"], ["24", "48"]]
  assert "2,069 images/s per chip" in rows[0][2] and "960 images/s per chip" in rows[1][2]


def test_bad_flags(input_speed, capsys):  # pylint: disable=redefined-outer-name
  with pytest.raises(SystemExit):
    input_speed.main(["--images=2", "--batch=4"])
  assert "must hold at least one --batch" in capsys.readouterr().err
  with pytest.raises(SystemExit, match="may use"):
    input_speed.main(TINY + [f"--cores={len(os.sched_getaffinity(0)) + 1}"])
