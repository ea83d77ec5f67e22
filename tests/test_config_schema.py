"""The config schema: every field of every section is checked before anything is written, and
every config file, with every method, loads and validates.

The bad values are generated from the schema (config_lib.SCHEMA), so a field added to the
table is tried here without editing this file.
"""
import glob
import os

import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_config

from datafree_jax import config_lib
from datafree_jax import losses
from datafree_jax import pipeline
from datafree_jax import registry
from test_bad_input import assert_rejected

FIELDS = config_lib.schema_fields()
# A value of the wrong type for each kind of field.
WRONG_TYPE = {int: 1.5, float: "fast", str: 3, bool: "yes", tuple: "0.4"}


def _cases():
  for name, default, domain in FIELDS:
    for value in domain.bad_values() + [WRONG_TYPE[domain.kind]]:
      yield pytest.param(name, value, domain, id=f"{name}={value!r}")


def _set(config, name, value):
  node = config
  *parents, leaf = name.split(".")
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value


def test_the_schema_is_the_base_config():
  base = config_lib.base_config()
  flat = {f"{k}.{kk}" if isinstance(v, dict) else k
          for k, v in base.to_dict().items() for kk in (v if isinstance(v, dict) else [None])}
  assert flat == {name for name, _, _ in FIELDS}
  # (warmup_steps in the 4 optimiser sections, data_threads, checkpoint_async and
  # checkpoint_preemption_secs since 2026-12-03), and the sections that methods.py registers
  # with its methods:
  registered = {"deepinversion", "cmi", "fast"}
  assert len(FIELDS) - sum(len(config_lib.SCHEMA[s]) for s in registered) == 87
  assert len(config_lib.SCHEMA["deepinversion"]) == 24
  assert len(config_lib.SCHEMA["cmi"]) == 28
  assert len(config_lib.SCHEMA["fast"]) == 22
  for name, default, domain in FIELDS:
    domain.check(name, default)  # Every default is inside its own domain.
  assert config_lib.MM_FORMS == losses.BN_MOMENT_FORMS


@pytest.mark.parametrize("name,value,domain", list(_cases()))
def test_every_bad_field_value_is_rejected_before_anything_is_written(tmp_path, capsys, name,
                                                                      value, domain):
  config = tiny_config("ensemble", **{"teacher.model": "lenet5_bn"})
  _set(config, name, value)
  workdir = tmp_path / "w"
  line = assert_rejected(config, workdir, capsys, "")
  label = getattr(domain, "label", None)
  assert name in line or (label and f"unknown {label} {value!r}" in line), line
  assert not workdir.exists()


def test_unknown_and_missing_fields_are_errors():
  config = tiny_config("dafl")
  config.teacher.stepz = 3
  with pytest.raises(config_lib.ConfigError, match="unknown config field teacher.stepz"):
    config_lib.check_config(config)
  config = tiny_config("dafl")
  config.learning_rate = 0.1
  with pytest.raises(config_lib.ConfigError, match="unknown config field 'learning_rate'"):
    config_lib.check_config(config)
  config = tiny_config("dafl")
  del config.student["temperature"]
  with pytest.raises(config_lib.ConfigError, match="student.temperature is missing"):
    config_lib.check_config(config)


@pytest.mark.parametrize("ups,ok", [(0, True), (5, True), (6, False)])
def test_generator_upsampling_must_fit_the_image_size(ups, ok):
  config = tiny_config("dafl", **{"generator.num_upsample": ups})
  if ok:
    pipeline.validate(config)
  else:
    with pytest.raises(config_lib.ConfigError, match="num_upsample=6 does not fit the 32x32"):
      pipeline.validate(config)


CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(REPO_ROOT, "configs", "*.py"))
                      if not os.path.basename(p).startswith("_"))
# (config file, argument) pairs that are refused on purpose, with the reason's text.
REFUSED = {("mnist.py", "model=hinton,method=ensemble"): "needs model=lenet5",
           ("mnist.py", "model=hinton,method=deepinversion"): "needs model=lenet5",
           ("mnist.py", "model=hinton,method=cmi"): "needs model=lenet5",
           ("mnist.py", "model=hinton,method=fast"): "needs model=lenet5",
           ("imagenet.py", "method=cmi"): "unknown method",
           ("imagenet.py", "method=deepinversion"): "unknown method",
           ("imagenet.py", "method=fast"): "unknown method"}


def _arguments(path):
  """Every method, and for mnist.py every model, of a config file."""
  models = ("lenet5", "hinton") if os.path.basename(path) == "mnist.py" else (None,)
  for model in models:
    for method in registry.names():  # the built-in methods (collected before any registers)
      yield f"model={model},method={method}" if model else f"method={method}"


@pytest.mark.parametrize("path,arg", [(p, a) for p in CONFIG_FILES for a in _arguments(p)],
                         ids=lambda x: os.path.basename(x) if str(x).endswith(".py") else x)
def test_every_config_file_validates_with_every_method(path, arg):
  assert len(CONFIG_FILES) == 5
  assert sorted(config_lib.packaged_configs()) == sorted(
      os.path.basename(p)[:-3] for p in CONFIG_FILES)
  refused = REFUSED.get((os.path.basename(path), arg))
  if refused:
    with pytest.raises(config_lib.ConfigError, match=refused):
      pipeline.validate(config_lib.load_config_file(path, arg))
    return
  config = config_lib.load_config_file(path, arg)
  assert config.method == arg.split("method=")[1]
  pipeline.validate(config)


def test_mnist5k_default_ensemble_is_its_long_setting_and_quick_the_short_one():
  path = os.path.join(REPO_ROOT, "configs", "mnist5k.py")
  setting = lambda c: (c.ensemble.steps, c.student.steps, c.student.temperature,
                       c.student.augment_shift)
  assert setting(config_lib.load_config_file(path)) == (600, 2400, 4.0, 2)
  assert setting(config_lib.load_config_file(path, "long=True")) == (600, 2400, 4.0, 2)
  assert setting(config_lib.load_config_file(path, "quick=True")) == (150, 800, 1.0, 0)
  assert config_lib.load_config_file(path, "method=dafl").student.steps == 800
  for arg, message in (("method=dafl,quick=True", "quick=True is a setting of method=ensemble"),
                       ("long=True,quick=True", "contradict")):
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.load_config_file(path, arg)


def test_imagenet_recipes_warm_up_and_mobilenet_v2_has_its_own():
  path = os.path.join(REPO_ROOT, "configs", "imagenet.py")
  c = config_lib.load_config_file(path)
  assert c.teacher.warmup_steps == c.student.warmup_steps == 6256   # 5 epochs at batch 1024
  assert (c.student.lr, c.student.weight_decay) == (0.4, 1e-4)
  m = config_lib.load_config_file(path, "student=mobilenet_v2")
  assert (m.student.model, m.student.weight_decay) == ("mobilenet_v2", 4e-5)
  np.testing.assert_allclose(m.student.lr, 0.045 * 1024 / 256)
  assert m.teacher.lr == 0.4                                        # the teacher keeps its own
  smoke = config_lib.load_config_file(path, "smoke=True")
  assert smoke.teacher.warmup_steps == smoke.student.warmup_steps == 0
