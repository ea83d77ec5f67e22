"""Command line: python -m datafree_jax.main [--config=NAME|FILE.py[:args]] [--workdir=DIR].

NAME is a config installed with the package (configs/NAME.py: mnist5k, mnist, cifar10, ...);
FILE.py any config file.
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from datafree_jax import config_lib

DEFAULT_CONFIG = config_lib.resolve_config_path("mnist5k")


def _config_field_error(e: Exception):
  """--config.a.b=... naming a field the config lacks: one line, exit code 2."""
  if "--debug" in sys.argv:
    raise e
  detail = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
  if len(detail) > 1 and detail[0] == detail[-1] == "'":  # The repr of a KeyError's message.
    detail = detail[1:-1]
  detail = detail.strip()
  print(f"error: unknown config field: {detail}", file=sys.stderr)
  sys.exit(2)


try:  # config_flags applies --config.* overrides to the default config already here.
  config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG,
      "Config name or file, optionally with ':args' (default: mnist5k).", lock_config=True)
except (KeyError, AttributeError) as err:
  _config_field_error(err)
flags.DEFINE_string("workdir", None, "Output directory (default: ./workdir/<dataset>-<method>).")
flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")


def main(argv):
  # orbax reports every checkpoint at INFO and warns about each item a restore leaves out.
  logging.set_verbosity(logging.ERROR)
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])} (the options are --config, "
          "--config.<field>=<value>, --workdir and --debug)", file=sys.stderr)
    return 2
  # config_flags loads the file lazily and fails on first use with a traceback; its
  # "FILE:ARGS" is split at the first ':' as config_flags does.
  path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":", 1)[0]
  try:
    config_lib.resolve_config_path(path)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from datafree_jax import train  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join(
      "workdir", f"{config.dataset}-{config.method}-seed{config.seed}")
  return train.main_entry(config, workdir, debug=flags.FLAGS.debug)


def _with_config_paths(argv):
  """argv with --config=NAME[:args] (a packaged config's name) replaced by its file."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + _config_path(a[len("--config="):])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = _config_path(out[i + 1])
  return out


def _config_path(value: str) -> str:
  spec, sep, args = value.partition(":")
  try:
    return config_lib.resolve_config_path(spec) + sep + args
  except config_lib.ConfigError:
    return value  # main() reports it as one line


def _parse_flags(argv):
  """absl flag parsing with a config error shown as one line (all of it with --debug)."""
  argv = _with_config_paths(argv)
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:
    _config_field_error(e)
  except flags.Error as e:
    text = str(e).strip()
    if "--debug" in argv:
      print(text, file=sys.stderr)
    # config_flags wraps the config file's own exception; its last line is "module.Error: msg".
    last = text.splitlines()[-1].strip()
    head, sep, rest = last.partition(": ")
    if sep and "Error" in head.split(".")[-1]:
      last = rest
    print(f"error: {last}", file=sys.stderr)
    sys.exit(2)


def cli():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
