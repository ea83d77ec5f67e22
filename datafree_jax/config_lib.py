"""Config helpers: big_vision-style `get_config(arg)` argument parsing and config validation.

`--config=configs/mnist5k.py:method=ensemble,seed=1` calls `get_config("method=ensemble,seed=1")`;
each config file passes its switches and their defaults to `parse_arg`, which returns a
ConfigDict with the values converted to the defaults' types. Unknown keys are errors.
"""
from __future__ import annotations

import ast
import importlib.util
import math
import os

import ml_collections

from datafree_jax import datasets
from datafree_jax import platforms
from datafree_jax import registry
from datafree_jax.errors import ConfigError
from datafree_jax.models import classifiers


TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")


def from_text(text: str, current):
  """`text` read as the type of `current` (a config value: bool, int, float, str, a tuple or
  list of them, or None, which takes the string); ValueError (the reason) if it is not one.
  The one string-to-type converter: --config.a.b=VALUE and get_config's 'k=v' both use it."""
  if current is None:
    return text
  if isinstance(current, (tuple, list)):
    kinds = {_scalar_kind(v) for v in current}
    kind = kinds.pop() if len(kinds) == 1 else float if kinds == {int, float} else None
    items = [_convert_element(kind, item, text) for item in _tuple_items(text)]
    return type(current)(items)
  if _scalar_kind(current):
    return _convert_scalar(_scalar_kind(current), text)
  raise ValueError(f"a field holding a {type(current).__name__} cannot be set on the command "
                   "line")


def _scalar_kind(value) -> type | None:
  """bool, int, float or str (numpy's scalars too: np.float64 is a float), or None."""
  return next((k for k in (bool, int, float, str) if isinstance(value, k)), None)


def _convert_scalar(kind: type, text: str):
  if kind is bool:
    if text.strip().lower() in TRUE:
      return True
    if text.strip().lower() in FALSE:
      return False
  elif kind is int:
    try:
      return int(text)
    except ValueError:
      pass
  elif kind is float:
    try:
      return float(text)
    except ValueError:
      pass
  elif kind is str:
    return text
  raise ValueError(f"could not convert string to {kind.__name__}: {text!r}")


def _tuple_items(text: str) -> list:
  """The elements of '0.3,0.6' (strings) or of a literal '(0.3, 0.6)' / '[0.3]' (values)."""
  s = text.strip()
  if s.startswith(("(", "[")):
    try:
      value = ast.literal_eval(s)
    except Exception:  # pylint: disable=broad-except  (SyntaxError, ValueError, ...)
      raise ValueError(f"could not read {text!r} as a tuple") from None
    return list(value) if isinstance(value, (tuple, list)) else [value]
  items = [p.strip() for p in s.split(",")] if s else []
  if len(items) > 1 and not items[-1]:  # '0.5,' is the tuple (0.5,)
    items.pop()
  return items


def _convert_element(kind: type | None, item, text: str):
  if isinstance(item, str) and kind is not str:
    if kind is not None:
      try:
        return _convert_scalar(kind, item)
      except ValueError as e:
        raise ValueError(f"{e} in {text!r}") from None
    try:
      return ast.literal_eval(item)
    except Exception:  # pylint: disable=broad-except
      return item
  ok = {None: lambda v: True,
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str)}
  if not ok[kind](item):
    raise ValueError(f"could not convert {item!r} to {kind.__name__} in {text!r}")
  return float(item) if kind is float else item


def describe_kind(current) -> str:
  """What a value of `current`'s type is written as, for error messages."""
  names = {bool: "a boolean: true/false, yes/no, on/off or 1/0", int: "an integer",
           float: "a number", str: "a string"}
  if isinstance(current, (tuple, list)):
    kinds = {_scalar_kind(v) for v in current}
    plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    what = (plural.get(kinds.pop(), "values") if len(kinds) == 1 else
            "numbers" if kinds == {int, float} else "values")
    return f"a tuple of {what}, e.g. 0.3,0.6 or (0.3, 0.6)"
  return names.get(_scalar_kind(current), f"a {type(current).__name__}")


def packaged_configs() -> dict:
  """{name: path} of the configs installed with the package (datafree_jax.configs)."""
  spec = importlib.util.find_spec("datafree_jax.configs")
  if spec is None or not spec.submodule_search_locations:
    return {}
  folder = list(spec.submodule_search_locations)[0]
  return {n[:-3]: os.path.join(folder, n) for n in sorted(os.listdir(folder))
          if n.endswith(".py") and not n.startswith("_")}


def resolve_config_path(spec: str) -> str:
  """The file of a --config value: an existing path, or the name of a packaged config
  ('mnist5k', also 'mnist5k.py' or 'configs/mnist5k.py' when no such file is here)."""
  if os.path.isfile(spec):
    return spec
  name = os.path.basename(spec)
  name = name[:-3] if name.endswith(".py") else name
  packaged = packaged_configs()
  if name in packaged and os.path.dirname(spec) in ("", "configs"):
    return packaged[name]
  raise ConfigError(f"config file {spec!r} does not exist (packaged configs: "
                    f"{', '.join(packaged) or 'none'})")


def load_config_file(path: str, arg: str = "") -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path`, or of the packaged config of that name
  (what --config=path:arg loads)."""
  path = resolve_config_path(path)
  name = "config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise ConfigError(f"config file {path!r} is not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'k1=v1,k2=v2' (or '' / None) against `defaults`; a bare 'k' means k=True."""
  out = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(
          f"unknown config argument {key!r}; this config takes: {', '.join(sorted(defaults))}")
    value = value.strip()
    if isinstance(defaults[key], bool) and not value:
      out[key] = True
      continue
    try:
      out[key] = from_text(value, defaults[key])
    except ValueError:
      raise ConfigError(f"config argument {key}={value!r}: expected "
                        f"{describe_kind(defaults[key])}") from None
  return ml_collections.ConfigDict(out)


def check_choice(name: str, value, choices):
  Choice(choices).check(name, value)


# --- The config schema: every field, its default and its domain -----------------------------
#
# Each field of every section is declared once, with its default and a `Domain` that checks a
# value (type, range or choice). `base_config()` builds the defaults from the table and
# `check_config(config)` checks every field of a config against it, before a run writes
# anything; a field the table does not know is an error too.

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "step")
GENERATOR_STYLES = ("dafl", "luo")
ENSEMBLE_LOSSES = ("luo", "dafl")
LOWERINGS = ("auto", "vmap", "loop")
DTYPES = ("float32", "bfloat16")
DISTILL_LAYOUTS = ("auto", "replicated", "sharded")
SINGLE_TARGETS = ("conditional", "random", "argmax")
MM_FORMS = ("l2", "kl")  # losses.BN_MOMENT_FORMS (tests/test_config_schema.py checks they agree)


def _type_name(kind) -> str:
  return {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
          tuple: "a tuple of numbers"}[kind]


class Domain:
  """The values a config field may take; `check(name, value)` raises ConfigError otherwise."""

  kind: type = object

  def check(self, name: str, value):
    raise NotImplementedError

  def bad_values(self) -> list:
    """Values outside the domain (of the right type), for the tests that try every field."""
    return []

  def _check_type(self, name, value):
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          bool: lambda v: isinstance(v, bool),
          tuple: lambda v: isinstance(v, (tuple, list))}[self.kind](value)
    if not ok:
      raise ConfigError(f"{name} must be {_type_name(self.kind)}, got {value!r}")


class Number(Domain):
  """An int or float in a range: `low` < value (or <= with low_inclusive), value < `high`."""

  def __init__(self, kind=float, low=None, low_inclusive=True, high=None, note=""):
    self.kind, self.low, self.low_inclusive, self.high, self.note = (
        kind, low, low_inclusive, high, note)

  def check(self, name, value):
    self._check_type(name, value)
    if self.kind is float and not math.isfinite(value):
      raise ConfigError(f"{name} must be a finite number, got {value}")
    low, high = self.low, self.high
    if low is not None and not (value >= low if self.low_inclusive else value > low):
      bound = ("positive" if low == 0 and not self.low_inclusive else
               f"{'>=' if self.low_inclusive else '>'} {low}{self.note}")
      raise ConfigError(f"{name} must be {bound}, got {value}")
    if high is not None and not value < high:
      raise ConfigError(f"{name} must be < {high}, got {value}")

  def bad_values(self):
    out = []
    if self.low is not None:
      out.append(self.kind(self.low) - 1 if self.low_inclusive else self.kind(self.low))
    if self.high is not None:
      out.append(self.kind(self.high))
    if self.kind is float:
      out.append(float("nan"))
    return out


class Choice(Domain):
  """One of a fixed set of strings; `choices` may be a function (registries read lazily)."""

  kind = str

  def __init__(self, choices, label=None, listing="choose one of"):
    self._choices, self.label, self.listing = choices, label, listing

  def choices(self):
    return tuple(self._choices() if callable(self._choices) else self._choices)

  def check(self, name, value):
    self._check_type(name, value)
    choices = self.choices()
    if value not in choices:
      label = self.label or name
      raise ConfigError(f"unknown {label} {value!r}; {self.listing}: {', '.join(choices)}")

  def bad_values(self):
    return ["no_such_choice"]


class Flag(Domain):
  kind = bool

  def check(self, name, value):
    self._check_type(name, value)


class Text(Domain):
  """Any string (a path; whether it exists is checked where it is used)."""
  kind = str

  def check(self, name, value):
    self._check_type(name, value)


class Fractions(Domain):
  """A non-decreasing tuple of fractions of the run, each in (0, 1) (step schedule boundaries)."""
  kind = tuple

  def check(self, name, value):
    self._check_type(name, value)
    for v in value:
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise ConfigError(f"{name} must hold fractions of the run in (0, 1), got {tuple(value)}")
    if list(value) != sorted(value):
      raise ConfigError(f"{name} must be in increasing order, got {tuple(value)}")

  def bad_values(self):
    return [(0.8, 0.4), (0.5, 1.5)]


def _methods():
  return registry.names()


def _stages():
  return registry.stage_selectors()


def _datasets():
  return sorted(datasets.DATASETS)


def _models():
  return sorted(classifiers.CLASSIFIERS)


POSITIVE = Number(float, 0, low_inclusive=False)
NON_NEGATIVE = Number(float, 0)
POSITIVE_INT = Number(int, 0, low_inclusive=False)
NON_NEGATIVE_INT = Number(int, 0)
FRACTION = Number(float, 0, high=1)  # [0, 1): momentum, Adam's betas


def _optimizer_fields(lr, schedule="constant", **extra):
  # warmup_steps: the learning rate ramps linearly from lr/warmup_steps to the schedule's over
  # the first warmup_steps steps (Goyal et al.'s large-batch warmup; 0 = none).
  return dict(optimizer=("adam", Choice(OPTIMIZERS)), lr=(lr, POSITIVE),
              schedule=(schedule, Choice(SCHEDULES)), warmup_steps=(0, NON_NEGATIVE_INT),
              weight_decay=(0.0, NON_NEGATIVE), **extra)


def _classifier_fields(role, model, steps, batch_size, lr, schedule, **extra):
  return dict(
      model=(model, Choice(_models, label=f"{role} model", listing="known models")),
      width=(0, NON_NEGATIVE_INT),  # ResNets' base width; 0 = 64. Ignored by other models.
      steps=(steps, POSITIVE_INT), batch_size=(batch_size, POSITIVE_INT),
      **_optimizer_fields(lr, schedule),
      boundaries=((0.4, 0.8), Fractions()),  # schedule 'step': x0.1 at each fraction of steps
      momentum=(0.9, FRACTION),              # SGD only
      eval_every=(0, NON_NEGATIVE_INT), **extra)


SCHEMA = {
    "dataset": ("mnist5k", Choice(_datasets, label="dataset", listing="known datasets")),
    "data_dir": ("", Text()),              # tfds data dir; '' = $TFDS_DATA_DIR or tfds' default.
    # Streamed datasets: threads of the training pipeline's own tf.data pool (decoding);
    # 0 = tf.data's default (all cores). The launchers set it from the host's CPU request.
    "data_threads": (0, NON_NEGATIVE_INT),
    "image_size": (0, NON_NEGATIVE_INT),   # images resized to this; 0 = the dataset's size
    "method": ("dafl", Choice(_methods, label="method")),  # registry.METHODS
    "stage": ("all", Choice(_stages, label="stage")),  # see pipeline.py
    # stage=distill of method ensemble: '' = <workdir>/generators
    "generator_checkpoint": ("", Text()),
    "seed": (0, NON_NEGATIVE_INT),
    "log_every_secs": (10.0, NON_NEGATIVE),
    "checkpoint_every": (500, NON_NEGATIVE_INT),  # steps between checkpoints; 0 = final only
    # Periodic checkpoints written in the background while training goes on (checkpoints.py).
    "checkpoint_async": (True, Flag()),
    # The time the save on SIGTERM may take (a spot VM's notice is about 30 s); past it the
    # run says which complete checkpoint a resume will use.
    "checkpoint_preemption_secs": (25.0, POSITIVE),
    # Computation dtype of teacher, generators and student; parameters, optimiser state, BN
    # statistics and loss reductions stay float32.
    "dtype": ("float32", Choice(DTYPES)),
    # Lower and compile one step of every stage from abstract inputs and print a sizing table
    # (dry_run.py); nothing is trained or written.
    "dry_run": (False, Flag()),
    # The platform whose programs the dry run sizes: auto = the devices' own, 'tpu' on a CPU.
    "dry_run_target": ("auto", Choice(platforms.CHOICES)),
    "dry_run_hbm_gib": (0.0, NON_NEGATIVE),   # fail when a program needs more per device; 0 = off
    # The fraction of a device's peak bfloat16 FLOP/s the dry run's hours assume where no
    # measured throughput is given (published ResNet-50 training on an H100: about 7%).
    "dry_run_mfu": (0.05, Number(float, 0, low_inclusive=False, high=1)),
    # A measuring dry run's JSON (dry_run_out of a run with dry_run_measure on the device
    # kind): its achieved TFLOP/s replaces dry_run_mfu for that kind.
    "dry_run_measured": ("", Text()),
    "dry_run_measure": (False, Flag()),   # also run every program on the devices present
    "dry_run_out": ("", Text()),          # write the dry run's rows here as JSON
    # The platform whose formulation the programs take (platforms.py): auto = the platform of
    # the devices the mesh is built from.
    "platform": ("auto", Choice(platforms.CHOICES)),
    "teacher": _classifier_fields(
        "teacher", "lenet5", 1000, 128, 1e-3, "cosine",
        augment_shift=(0, NON_NEGATIVE_INT), augment_flip=(False, Flag()),
        bn_stats_per_class=(100, POSITIVE_INT),
        # A trained teacher to start from instead of training one: a teacher stage directory
        # (<workdir>/teacher of another run, or a checkpoint with the same 'teacher' item).
        # The stage then takes 0 steps: it evaluates it and computes its BN statistics.
        init_from=("", Text())),
    "student": _classifier_fields(
        "student", "lenet5_half", 1000, 256, 2e-3, "constant", temperature=(1.0, POSITIVE),
        # Distillation stages: random shifts / flips of the images both networks see.
        augment_shift=(0, NON_NEGATIVE_INT), augment_flip=(False, Flag())),
    "generator": dict(
        style=("dafl", Choice(GENERATOR_STYLES)), latent_dim=(100, POSITIVE_INT),
        width=(128, POSITIVE_INT), num_upsample=(2, NON_NEGATIVE_INT),
        **_optimizer_fields(0.2), b1=(0.9, FRACTION), b2=(0.999, FRACTION),
        w_oh=(1.0, NON_NEGATIVE), w_a=(0.1, NON_NEGATIVE), w_ie=(5.0, NON_NEGATIVE)),
    # Luo et al.'s per-class generator ensemble (method 'ensemble', stages/ensemble.py). The
    # generators take latent_dim/width/num_upsample from `generator`, the style from here.
    "ensemble": dict(
        num_generators=(0, NON_NEGATIVE_INT),  # 0 = one per class; 1 = one for all classes
        # G = 1: 'conditional' (a class-conditional generator, one class per step; the authors'
        # code), or an unconditional one with a target per sample: 'random' or 'argmax'.
        single_target=("conditional", Choice(SINGLE_TARGETS)),
        style=("luo", Choice(GENERATOR_STYLES)),
        loss=("luo", Choice(ENSEMBLE_LOSSES)),  # inceptionism + moment matching | DAFL's terms
        steps=(150, POSITIVE_INT), batch_per_generator=(32, POSITIVE_INT),
        **_optimizer_fields(0.01), b1=(0.9, FRACTION), b2=(0.999, FRACTION),
        w_tv=(0.0, NON_NEGATIVE), w_l2=(0.0, NON_NEGATIVE), w_mm=(1.0, NON_NEGATIVE),
        mm_form=("l2", Choice(MM_FORMS)),
        lowering=("auto", Choice(LOWERINGS)),  # auto: loop on CPU, vmap elsewhere
        max_generators_per_device_at_once=(0, NON_NEGATIVE_INT),  # 0 = all local at once
        # Distillation: the frozen generators on every device ('replicated') or split over the
        # devices, each drawing images from its own ('sharded'); auto: sharded when there are
        # at least as many generators as devices.
        distill_layout=("auto", Choice(DISTILL_LAYOUTS)),
        eval_every=(50, NON_NEGATIVE_INT)),
}


def register_section(section: str, fields: dict):
  """Adds config section `section` ({field: (default, Domain)}) to the schema: a method
  registered from outside the package brings its own settings this way."""
  if section in SCHEMA and SCHEMA[section] != fields:
    raise ValueError(f"config section {section!r} exists already")
  SCHEMA[section] = dict(fields)


def schema_fields():
  """[(dotted name, default, Domain)] for every field of every section, in table order."""
  out = []
  for key, entry in SCHEMA.items():
    if isinstance(entry, dict):
      out.extend((f"{key}.{k}", d, dom) for k, (d, dom) in entry.items())
    else:
      out.append((key, entry[0], entry[1]))
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every key a config may set, with defaults; experiment configs override what they need."""
  c = ml_collections.ConfigDict()
  for key, entry in SCHEMA.items():
    if isinstance(entry, dict):
      c[key] = ml_collections.ConfigDict({k: d for k, (d, _) in entry.items()})
    else:
      c[key] = entry[0]
  return c


def check_section(config, section: str):
  """Checks every field of one section (a dict of the table) of `config`; raises ConfigError."""
  entry = SCHEMA[section]
  values = config[section]
  unknown = sorted(set(values.keys()) - set(entry))
  if unknown:
    raise ConfigError(f"unknown config field {section}.{unknown[0]}; {section} has: "
                      f"{', '.join(entry)}")
  missing = [k for k in entry if k not in values]
  if missing:
    raise ConfigError(f"config field {section}.{missing[0]} is missing")
  for key, (_, domain) in entry.items():
    domain.check(f"{section}.{key}", values[key])


def check_config(config):
  """Checks every field of every section of `config` against SCHEMA; raises ConfigError.

  Only each field's own domain: what depends on several fields (stage vs method, image size vs
  upsampling, batch vs devices) is checked by pipeline.validate.
  """
  unknown = sorted(set(config.keys()) - set(SCHEMA))
  if unknown:
    raise ConfigError(f"unknown config field {unknown[0]!r}; a config has: {', '.join(SCHEMA)}")
  for key, entry in SCHEMA.items():
    if key not in config:
      raise ConfigError(f"config field {key} is missing")
    if isinstance(entry, dict):
      check_section(config, key)
    else:
      entry[1].check(key, config[key])
