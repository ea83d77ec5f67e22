"""Seconds per DAFL joint step (generator + student update) at the paper's MNIST setting
(generator width 128, batch 512) and at the mnist5k config's setting.

    python benchmarks/dafl_step_speed.py [--steps=5]

Uses a randomly initialised LeNet-5 teacher (speed does not depend on its weights).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from datafree_jax import common, config_lib, input_pipeline, models  # pylint: disable=g-import-not-at-top,wrong-import-position
from datafree_jax.stages import dafl  # pylint: disable=g-import-not-at-top,wrong-import-position


def config():
  return config_lib.load_config_file(os.path.join(REPO, "configs", "mnist5k.py"))


def time_step(width, batch, latent, steps):
  c = config()
  c.generator.width, c.student.batch_size, c.generator.latent_dim = width, batch, latent
  info = input_pipeline.dataset_info("mnist5k")
  tmodel = models.get_classifier("lenet5", 10)
  tp, tbs = common.init_model(tmodel, jax.random.key(0), info.image_shape)
  teacher = {"model": tmodel, "variables": common.variables_of(tp, tbs), "meta": {}}
  state, step, *_ = dafl.build(c, teacher, info)
  state, m = step(state, None)
  jax.block_until_ready(m)
  t0 = time.time()
  for _ in range(steps):
    state, m = step(state, None)
    jax.device_get(m)
  return (time.time() - t0) / steps


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=5)
  args = p.parse_args()
  c = config()
  rows = [("paper MNIST (width 128, batch 512, latent 100)", 128, 512, 100),
          (f"mnist5k config (width {c.generator.width}, batch {c.student.batch_size}, latent "
           f"{c.generator.latent_dim})", c.generator.width, c.student.batch_size,
           c.generator.latent_dim)]
  print(f"backend: {jax.default_backend()}, devices: {jax.device_count()}")
  print("| setting | s/step |\n|---|---|")
  for name, w, b, l in rows:
    print(f"| {name} | {time_step(w, b, l, args.steps):.3f} |", flush=True)


if __name__ == "__main__":
  main()
