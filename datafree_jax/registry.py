"""The methods this project runs, by name: the one description of a method that the pipeline,
the config schema, the dry run, export and the plots read. Imports nothing of the
package (a method's stages are opaque objects here; stage.py defines their interface).

A method is the teacher stage followed by the method's own stages. methods.py registers the
built-in ones; `methods.register_method` adds one from outside the package.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Method:
  """What a method is made of and what it produces."""
  name: str
  stages: tuple              # stage.Stage objects in the order they run, the teacher stage first
  student_stage: str = ""    # the stage whose checkpoint holds the final student ('': none)
  image_stages: tuple = ()   # stages that make images: their sample grids and generator losses
                             # are what the plots show
  description: str = ""      # one line for help texts

  @property
  def teacher(self):
    return self.stages[0]

  def stage_names(self) -> tuple:
    return tuple(s.name for s in self.stages)


METHODS: dict[str, Method] = {}


def add(method: Method) -> Method:
  """Registers `method` under its name (replacing one of that name)."""
  if not method.stages:
    raise ValueError(f"method {method.name!r} has no stages (the teacher stage comes first)")
  names = method.stage_names()
  for stage_name in (method.student_stage, *method.image_stages):
    if stage_name and stage_name not in names:
      raise ValueError(f"method {method.name!r} names stage {stage_name!r}, which is not one "
                       f"of its stages {names}")
  METHODS[method.name] = method
  return method


def remove(name: str) -> None:
  METHODS.pop(name, None)


def get(name: str) -> Method:
  return METHODS[name]


def names() -> list:
  return list(METHODS)


def stage_selectors() -> list:
  """What config.stage may say: all, teacher, train and every registered stage's selector."""
  return ["all", "teacher", "train"] + sorted(
      {s.selector for m in METHODS.values() for s in m.stages[1:] if s.selector})


def image_stages() -> tuple:
  """Every registered method's image stages (the built-in ones first), without repeats."""
  return tuple(dict.fromkeys(s for m in METHODS.values() for s in m.image_stages))


def student_stage(method: str) -> str:
  """The stage that holds `method`'s final student ('' for an unknown method or none)."""
  m = METHODS.get(method)
  return m.student_stage if m else ""
