"""Config helpers: big_vision-style `get_config(arg)` argument parsing and config validation.

`--config=configs/mnist5k.py:method=ensemble,seed=1` calls `get_config("method=ensemble,seed=1")`;
each config file passes its switches and their defaults to `parse_arg`, which returns a
ConfigDict with the values converted to the defaults' types. Unknown keys are errors.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections


class ConfigError(ValueError):
  """A config that cannot run; the message says what to change."""


def _convert(key, value: str, default):
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes", "on", ""):
      return True
    if value.lower() in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"config argument {key}={value!r}: expected a boolean")
  if isinstance(default, int):
    try:
      return int(value)
    except ValueError:
      raise ConfigError(f"config argument {key}={value!r}: expected an integer") from None
  if isinstance(default, float):
    try:
      return float(value)
    except ValueError:
      raise ConfigError(f"config argument {key}={value!r}: expected a number") from None
  return value


def load_config_file(path: str, arg: str = "") -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path` (what --config=path:arg loads)."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
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
    out[key] = _convert(key, value.strip(), defaults[key])
  return ml_collections.ConfigDict(out)


def check_choice(name: str, value, choices):
  if value not in choices:
    raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, choices))}")


def check_positive(name: str, value):
  if not value > 0:
    raise ConfigError(f"{name} must be positive, got {value}")


def check_non_negative(name: str, value):
  if not value >= 0:
    raise ConfigError(f"{name} must be >= 0, got {value}")


def base_config() -> ml_collections.ConfigDict:
  """Every key a config may set, with defaults; experiment configs override what they need."""
  c = ml_collections.ConfigDict()
  c.dataset = "mnist5k"
  c.data_dir = ""              # tfds data dir; '' = $TFDS_DATA_DIR or tfds' default.
  c.method = "dafl"            # dafl | ensemble | kd_data | kd_noise | teacher
  c.stage = "all"              # all | teacher | train | generators | distill (see train.py)
  c.generator_checkpoint = ""  # stage=distill of method ensemble: '' = <workdir>/generators
  c.seed = 0
  c.log_every_secs = 10.0
  c.checkpoint_every = 500     # steps between periodic checkpoints of every stage
  c.debug_nan_at_step = -1     # tests: make the loss NaN at this step of each stage
  c.debug_stop_after_steps = -1  # tests: stop each stage after this many steps, as if killed

  c.teacher = ml_collections.ConfigDict(dict(
      model="lenet5", width=0, steps=1000, batch_size=128, optimizer="adam", lr=1e-3,
      schedule="cosine", boundaries=(0.4, 0.8), weight_decay=0.0, momentum=0.9,
      augment_shift=0, augment_flip=False,
      eval_every=0, bn_stats_per_class=100))
  c.student = ml_collections.ConfigDict(dict(
      model="lenet5_half", width=0, steps=1000, batch_size=256, optimizer="adam", lr=2e-3,
      schedule="constant", boundaries=(0.4, 0.8), weight_decay=0.0, momentum=0.9,
      temperature=1.0, eval_every=0))
  c.generator = ml_collections.ConfigDict(dict(
      style="dafl", latent_dim=100, width=128, num_upsample=2, optimizer="adam", lr=0.2,
      schedule="constant", b1=0.9, b2=0.999, weight_decay=0.0,
      w_oh=1.0, w_a=0.1, w_ie=5.0))
  # Luo et al.'s per-class generator ensemble (method 'ensemble', stages/ensemble.py). The
  # generators take latent_dim/width/num_upsample from `generator`, the style from here.
  c.ensemble = ml_collections.ConfigDict(dict(
      num_generators=0,          # 0 = one per class; 1 = one generator for all classes
      single_target="random",    # G = 1: target class per sample, 'random' | 'argmax'
      style="luo", loss="luo",   # loss: 'luo' (inceptionism + moment matching) | 'dafl'
      steps=150, batch_per_generator=32,
      optimizer="adam", lr=0.01, schedule="constant", b1=0.9, b2=0.999, weight_decay=0.0,
      # Sized for mnist5k on a 2-core CPU; this combination was measured (configs/mnist5k.py).
      w_tv=0.0, w_l2=0.0, w_mm=1.0, mm_form="l2",
      lowering="auto",           # auto (unroll on CPU, vmap elsewhere) | vmap | unroll
      max_generators_per_device_at_once=0,  # 0 = all local generators in one vmap/unroll
      eval_every=50))
  return c
