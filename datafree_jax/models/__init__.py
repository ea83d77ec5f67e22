"""Flax Linen models: classifiers (teachers, students) and generators."""
from datafree_jax.models.classifiers import CLASSIFIERS, UnknownModelError, get_classifier
from datafree_jax.models.generators import Generator
from datafree_jax.models.layers import BN_INPUTS, RecordingBatchNorm
