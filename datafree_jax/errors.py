"""The errors that mean "the user must change something": the command line prints their one-line
message (`error: ...`, exit code 2) instead of a traceback. Imports nothing of the package."""
from __future__ import annotations


class ConfigError(ValueError):
  """A config that cannot run; the message says what to change."""


class UnknownDatasetError(ValueError):
  """A dataset name that is not registered (datasets.py)."""


class UnknownModelError(ValueError):
  """A model name that is not registered (models.classifiers)."""


class DatasetNotPreparedError(RuntimeError):
  """The dataset is not prepared in the data dir (nothing here downloads)."""


class DatasetBuildError(ValueError):
  """Settings a local dataset build cannot take, or a data dir that holds another build."""


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, unreadable or made for something else."""


class TeacherError(RuntimeError):
  """A teacher that cannot be used: missing, unreadable, or not this model's."""


class NonFiniteError(RuntimeError):
  """A loss or gradient norm turned NaN/inf; the message names stage, step and term."""


class ExportError(ValueError):
  """Input the export cannot work with (workdir, run, stage or format); the message says why."""


class DistributedError(ValueError):
  """Settings that cannot start a multi-process run; the message says which."""


# What the command line reports as one line `error: ...` with exit code 2.
USER_ERRORS = (ConfigError, UnknownDatasetError, UnknownModelError, DatasetNotPreparedError,
               DatasetBuildError, CheckpointError, TeacherError, NonFiniteError, ExportError,
               DistributedError)
