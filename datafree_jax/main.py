"""Command line: python -m datafree_jax.main [--config=configs/NAME.py[:args]] [--workdir=DIR]."""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_REPO_ROOT, "configs", "mnist5k.py")

config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Config file, optionally with ':args' (default: configs/mnist5k.py).",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (default: ./workdir/<dataset>-<method>).")
flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax and absl report every checkpoint at INFO.
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from datafree_jax import train  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join(
      "workdir", f"{config.dataset}-{config.method}-seed{config.seed}")
  return train.main_entry(config, workdir, debug=flags.FLAGS.debug)


def cli():
  app.run(main)


if __name__ == "__main__":
  cli()
