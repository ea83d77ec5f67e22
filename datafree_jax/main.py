"""Command line: python -m datafree_jax.main [--config=SPEC] [--config.FIELD=VALUE ...]
                                            [--workdir=DIR] [--debug]
              python -m datafree_jax.main export --workdir=DIR [--format=...] [--out=DIR]
                                                [--stage=NAME] [--debug]
              python -m datafree_jax.main make-jpeg-dataset [--data_dir=DIR] [--classes=N]
                                                [--train_examples=N] ... [--debug]

  --config=NAME|FILE.py[:args]  the config (default: mnist5k). NAME is a config installed with
                                the package (configs/NAME.py: mnist5k, mnist, cifar10, ...),
                                FILE.py any config file; the file's get_config(args) gets the
                                text after the first ':' ('' without one).
  --config.a.b=VALUE            sets field a.b of the loaded config, VALUE read as the type of
                                the field's value there: bool (true/false, yes/no, on/off, 1/0;
                                a bare --config.a.b is true), int, float, str, tuple (0.3,0.6 or
                                (0.3, 0.6)); a field that is None takes the string. Any number,
                                applied in order after the config is loaded.
  --workdir=DIR                 output directory (default: workdir/<dataset>-<method>-seed<seed>)
  --debug, --nodebug            full tracebacks instead of one-line errors (default: --nodebug)
  --distributed=auto|on|off     multi-process runs (one process per host, every process runs the
                                same command): auto (default) starts jax.distributed when the
                                flags below (or their JAX_* variables) or the cluster that JAX
                                detects (a SLURM step, Open MPI, a Cloud TPU VM or GKE TPU
                                slice, a Kubernetes Indexed Job) have more than one process;
                                on always; off never
  --coordinator_address=HOST:PORT, --num_processes=N, --process_id=I
                                an explicit multi-process run (or JAX_COORDINATOR_ADDRESS,
                                JAX_NUM_PROCESSES, JAX_PROCESS_ID)
  -h, --help                    this text

`export` writes a finished run's student (or teacher) as SavedModel, TFLite, StableHLO and
ONNX files (`python -m datafree_jax.main export --help`: its flags). `make-jpeg-dataset`
builds the ImageNet-shaped JPEG dataset synthetic_imagenet locally, without downloads, for
`--config=configs/imagenet.py:smoke=True` and benchmarks/input_speed.py
(`python -m datafree_jax.main make-jpeg-dataset --help`: its flags).

--workdir may be a gs:// path (or any path etils.epath opens). --config, --config.a.b,
--workdir and the distributed flags also take their value as the next argument
(--config FILE.py). Bad input is one line `error: ...` on stderr and exit code 2.
"""
from __future__ import annotations

import difflib
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
import ml_collections

from datafree_jax import config_lib
from datafree_jax import distributed
from datafree_jax import errors
from datafree_jax import export
from datafree_jax import pipeline
from datafree_jax import synthetic_imagenet

DEFAULT_CONFIG = "mnist5k"
_OPTIONS = ("(the options are --config, --config.<field>=<value>, --workdir, --debug, "
            "--distributed, --coordinator_address, --num_processes and --process_id)")
_DISTRIBUTED_FLAGS = ("--distributed", "--coordinator_address", "--num_processes",
                      "--process_id")


class CommandLineError(ValueError):
  """An argument the command line does not take; the message says which."""


# --- --config.a.b=VALUE ----------------------------------------------------------------------

def apply_override(config: ml_collections.ConfigDict, key: str, text: str | None):
  """Sets field `key` ('a.b') of `config` to `text` read as the type of the field's value.

  bool: true/false, yes/no, on/off, 1/0 (any case), and None (a bare `--config.a.b`) is true;
  int; float; str as given; tuple or list: '0.3,0.6' or a Python literal '(0.3, 0.6)', each
  element read as the type of the field's elements (when they share one); a field that is None
  takes the string. Raises config_lib.ConfigError for a field `config` lacks and for a value
  that is not of the field's type.
  """
  flag = f"--config.{key}" if text is None else f"--config.{key}={text}"
  parts = key.split(".")
  node = config
  for i in range(len(parts) - 1):
    node = _field(node, parts, i, flag)
    if not isinstance(node, ml_collections.ConfigDict):
      raise config_lib.ConfigError(
          f"unknown config field: {parts[i + 1]!r} ({flag}; {'.'.join(parts[:i + 1])} is a "
          "field, not a section of fields)")
  current = _field(node, parts, len(parts) - 1, flag)
  if isinstance(current, ml_collections.ConfigDict):
    raise config_lib.ConfigError(f"flag {flag}: {key} is a section; set its fields, "
                                 f"--config.{key}.<field>, one of: {', '.join(current.keys())}")
  if text is None and not isinstance(current, bool):
    raise config_lib.ConfigError(f"flag {flag} needs a value: {flag}=VALUE")
  try:
    value = True if text is None else config_lib.from_text(text, current)
  except ValueError as e:
    raise config_lib.ConfigError(f"flag {flag}: {e} ({key} is {config_lib.describe_kind(current)})") from None
  try:
    node[parts[-1]] = value
  except TypeError as e:  # A typed placeholder (None until set) given the string.
    raise config_lib.ConfigError(f"flag {flag}: {e}") from None


def _field(node: ml_collections.ConfigDict, parts: list, i: int, flag: str):
  """node[parts[i]]; ConfigError if `node` (the section parts[:i]) has no such field."""
  name = parts[i]
  if name in node:
    return node[name]
  keys = [str(k) for k in node.keys()]
  close = difflib.get_close_matches(name, keys, n=1)
  if close:
    hint = f" Did you mean \"{close[0]}\" instead of \"{name}\"? ({flag})"
  else:
    hint = f" ({flag}; {'.'.join(parts[:i]) or 'the config'} has: {', '.join(keys)})"
  raise config_lib.ConfigError(f"unknown config field: {name!r}{hint}")


# --- The command line ------------------------------------------------------------------------

def parse_command_line(args: list) -> dict:
  """argv[1:] as {config, overrides: [(key, text or None)], workdir, debug, help, distributed:
  {mode, coordinator_address, num_processes, process_id: the ones given, as text}}; raises
  CommandLineError for an unknown flag, a positional argument or a flag without its value."""
  out = {"config": DEFAULT_CONFIG, "overrides": [], "workdir": None, "debug": False,
         "help": False, "distributed": {}}
  unknown, positional = [], []
  i = 0
  while i < len(args):
    arg = args[i]
    i += 1
    if arg == "--":
      positional.extend(args[i:])
      break
    if arg in ("-h", "--help"):
      out["help"] = True
      continue
    if not arg.startswith("-") or arg == "-":
      positional.append(arg)
      continue
    name, eq, value = arg.partition("=")
    if name == "--debug" or (name == "--nodebug" and not eq):
      if eq and value.strip().lower() not in config_lib.TRUE + config_lib.FALSE:
        raise CommandLineError(f"flag {arg}: expected true or false")
      out["debug"] = name == "--debug" and (not eq or value.strip().lower() in config_lib.TRUE)
    elif (name in ("--config", "--workdir") + _DISTRIBUTED_FLAGS
          or name.startswith("--config.")):
      if not eq:
        if i < len(args) and not args[i].startswith("--"):
          value = args[i]
          i += 1
        elif name.startswith("--config."):
          value = None  # A bare --config.a.b: a boolean field set to true.
        else:
          raise CommandLineError(f"flag {name} needs a value: {name}=VALUE")
      if name == "--config":
        out["config"] = value
      elif name in _DISTRIBUTED_FLAGS:
        out["distributed"]["mode" if name == "--distributed" else name[2:]] = value
      elif name == "--workdir":
        out["workdir"] = value
      else:
        out["overrides"].append((name[len("--config."):], value))
    else:
      unknown.append(name)
  if out["help"]:
    return out
  if unknown:
    raise CommandLineError(f"unknown flag{'s' if len(unknown) > 1 else ''}: "
                           f"{' '.join(unknown)} {_OPTIONS}")
  if positional:
    raise CommandLineError(f"unexpected arguments: {' '.join(positional)} {_OPTIONS}")
  return out


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The locked config of --config=NAME|FILE.py[:args]; raises config_lib.ConfigError, also
  (one line, the exception chained) when the config file's own code raises anything else."""
  name, _, arg = spec.partition(":")
  path = config_lib.resolve_config_path(name)
  try:
    config = config_lib.load_config_file(path, arg)
  except config_lib.ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    lines = str(e).strip().splitlines()
    raise config_lib.ConfigError(f"config file {path} failed: {type(e).__name__}"
                                 + (f": {lines[0]}" if lines else "")) from e
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  if not isinstance(config, ml_collections.ConfigDict):
    raise config_lib.ConfigError(f"config file {path}: get_config returned a "
                                 f"{type(config).__name__}, not a ConfigDict")
  config.lock()  # --config.a.b cannot add a field.
  return config


def _parse_sub_command_line(args: list, flags_taken: tuple, out: dict, takes: str,
                            convert=None) -> dict:
  """Reads a sub-command's arguments with the main command line's conventions into `out` (its
  defaults, with 'debug' and 'help'): -h/--help sets out['help'], --debug out['debug'],
  --FLAG=VALUE or --FLAG VALUE for FLAG in flags_taken out[FLAG] (convert(FLAG, VALUE) when
  given). Raises CommandLineError: an unknown argument (`takes`: what the sub-command takes, for
  the message), a flag without its value, or what convert raises."""
  i = 0
  while i < len(args):
    arg = args[i]
    i += 1
    name, eq, value = arg.partition("=")
    if arg in ("-h", "--help"):
      out["help"] = True
    elif name == "--debug" and not eq:
      out["debug"] = True
    elif name.startswith("--") and name[2:] in flags_taken:
      if not eq:
        if i == len(args) or args[i].startswith("--"):
          raise CommandLineError(f"flag {name} needs a value: {name}=VALUE")
        value = args[i]
        i += 1
      out[name[2:]] = convert(name[2:], value) if convert else value
    else:
      raise CommandLineError(f"unknown argument {arg!r} ({takes})")
  return out


def _sub_command_main(args: list, run) -> int:
  """Runs a sub-command, run(args); returns the exit code: 0, or 2 for bad input (a
  CommandLineError or a user error), one line `error: ...` on stderr (with --debug also the
  traceback)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  debug = "--debug" in args
  try:
    run(args)
  except (CommandLineError,) + errors.USER_ERRORS as e:
    if debug:
      traceback.print_exc()
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0


_EXPORT_FLAGS = ("workdir", "format", "out", "stage")


def parse_export_command_line(args: list) -> dict:
  """The arguments after `export` as {workdir, format, out, stage, debug, help}, read with the
  main command line's conventions (--flag=VALUE or --flag VALUE); raises CommandLineError."""
  out = _parse_sub_command_line(
      args, _EXPORT_FLAGS, {"workdir": None, "format": "all", "out": "", "stage": "",
                            "debug": False, "help": False},
      "export takes --workdir, --format, --out, --stage and --debug")
  if not out["help"] and not out["workdir"]:
    raise CommandLineError("export needs --workdir=DIR: the workdir of a finished run")
  return out


def _export(args: list):
  parsed = parse_export_command_line(args)
  if parsed["help"]:
    print(export.__doc__.strip())
    return
  export.export(parsed["workdir"], export.parse_formats(parsed["format"]), parsed["out"],
                parsed["stage"], printer=lambda line: print(line, flush=True))


def export_main(args: list) -> int:
  """`python -m datafree_jax.main export ...`: exports a finished run's student (or teacher);
  returns the exit code (2: bad input, one line `error: ...` on stderr)."""
  return _sub_command_main(args, _export)


MAKE_DATASET_HELP = f"""python -m datafree_jax.main make-jpeg-dataset [--data_dir=DIR] [--FLAG=VALUE ...]

Builds tfds dataset {synthetic_imagenet.NAME!r} (ImageNet-shaped JPEGs of class-dependent shapes,
colours and stripes plus noise; 'train' and 'validation' splits) into a tfds data dir, without
downloads; a data dir that holds the same build already is reused. Then:
  python -m datafree_jax.main --config=configs/imagenet.py:smoke=True --config.data_dir=DIR

  --data_dir=DIR          the tfds data dir (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)
  --classes=N             classes (default {synthetic_imagenet.Settings.classes}; another number needs
                          --name: {synthetic_imagenet.NAME} is registered with
                          {synthetic_imagenet.Settings.classes})
  --train_examples=N      images in 'train' (default {synthetic_imagenet.Settings.train_examples:,})
  --validation_examples=N images in 'validation' (default {synthetic_imagenet.Settings.validation_examples:,})
  --min_side=PX, --max_side=PX  each image side is drawn from this range (default
                          {synthetic_imagenet.Settings.min_side}..{synthetic_imagenet.Settings.max_side})
  --quality=Q             JPEG quality 1..100 (default {synthetic_imagenet.Settings.quality})
  --seed=S                the images are a function of the seed (default 0)
  --name=NAME             the tfds name (default {synthetic_imagenet.NAME})
  --debug                 full tracebacks instead of one-line errors
"""
_MAKE_DATASET_INT_FLAGS = ("classes", "train_examples", "validation_examples", "min_side",
                           "max_side", "quality", "seed")


def _int_flag(key: str, value: str):
  """make-jpeg-dataset's flag values: the integer of an integer flag, else the text."""
  if key not in _MAKE_DATASET_INT_FLAGS:
    return value
  try:
    return int(value)
  except ValueError:
    raise CommandLineError(f"flag --{key}: expected an integer, got {value!r}") from None


def parse_make_dataset_command_line(args: list) -> dict:
  """The arguments after `make-jpeg-dataset` as {data_dir, name, settings (a
  synthetic_imagenet.Settings), debug, help}, read with the main command line's conventions;
  raises CommandLineError (an unknown flag, a missing or non-integer value)."""
  flags_taken = ("data_dir", "name") + _MAKE_DATASET_INT_FLAGS
  out = _parse_sub_command_line(
      args, flags_taken, {"data_dir": None, "name": synthetic_imagenet.NAME, "debug": False,
                          "help": False},
      "make-jpeg-dataset takes " + ", ".join(f"--{f}" for f in flags_taken) + " and --debug",
      convert=_int_flag)
  out["settings"] = synthetic_imagenet.Settings(
      **{k: out.pop(k) for k in _MAKE_DATASET_INT_FLAGS if k in out})
  return out


def _make_dataset(args: list):
  parsed = parse_make_dataset_command_line(args)
  if parsed["help"]:
    print(MAKE_DATASET_HELP.strip())
    return
  parsed["settings"].check(parsed["name"])
  synthetic_imagenet.build(parsed["data_dir"], parsed["settings"], name=parsed["name"],
                           printer=lambda line: print(line, flush=True))


def make_dataset_main(args: list) -> int:
  """`python -m datafree_jax.main make-jpeg-dataset ...`: builds synthetic_imagenet; returns
  the exit code (2: bad input, one line `error: ...` on stderr)."""
  return _sub_command_main(args, _make_dataset)


def main(argv) -> int:
  # orbax reports every checkpoint at INFO and warns about each item a restore leaves out.
  logging.set_verbosity(logging.ERROR)
  if len(argv) > 1 and argv[1] == "export":
    return export_main(list(argv[2:]))
  if len(argv) > 1 and argv[1] == "make-jpeg-dataset":
    return make_dataset_main(list(argv[2:]))
  try:
    args = parse_command_line(list(argv[1:]))
  except CommandLineError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args["help"]:
    print(__doc__.strip())
    return 0
  try:  # Before anything touches a JAX backend (a config file may).
    distributed.initialize(**{"mode": "auto", **args["distributed"]})
  except distributed.DistributedError as e:
    if args["debug"]:
      traceback.print_exc()
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    config = load_config(args["config"])
    for key, text in args["overrides"]:
      apply_override(config, key, text)
  except config_lib.ConfigError as e:
    if args["debug"]:
      traceback.print_exc()
    print(f"error: {e}", file=sys.stderr)
    return 2
  workdir = args["workdir"] or os.path.join(
      "workdir", f"{config.dataset}-{config.method}-seed{config.seed}")
  return pipeline.main_entry(config, workdir, debug=args["debug"])


def _absl_flags_parser(argv):
  """absl's own flags at their defaults (app.run needs them parsed); main() reads argv."""
  flags.FLAGS(argv[:1])
  return argv


def cli():
  app.run(main, flags_parser=_absl_flags_parser)


if __name__ == "__main__":
  cli()
