"""Seconds per DAFL joint step (generator + student update) at the paper's MNIST setting
(generator width 128, batch 512) and at the mnist5k config's setting, the project's step only.

    python -m benchmarks.dafl_step_speed [--steps=5]

Uses a random LeNet-5 teacher (speed does not depend on its weights). Each step is compiled
first (its first call), then timed --steps times; s/step is the median.
step_speed's mnist5k and paper_mnist settings time the same steps beside PyTorch's.
"""
from __future__ import annotations

import argparse

from benchmarks import common, project, speed


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--steps", type=int, default=5)
  args = p.parse_args()
  c = project.load_config("mnist5k", "method=dafl")
  g = c.generator
  settings = [("paper MNIST (width 128, batch 512, latent 100)",
               speed.mnist_dafl_config(128, 512, 100)),
              (f"mnist5k config (width {g.width}, batch {c.student.batch_size}, latent "
               f"{g.latent_dim})", c)]
  print(common.machine_line())
  rows = []
  for name, config in settings:
    timed = speed.dafl_row(name, config, 0, None, []).jax
    timed.compile()
    timed.run(args.steps)
    rows.append([name, f"{timed.median():.3f}"])
    timed.release()
  print("\n".join(common.markdown_table(["setting", "s/step"], rows)))


if __name__ == "__main__":
  main()
