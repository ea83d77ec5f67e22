"""Flax Linen models: classifiers (teachers, students; ImageNet ones in imagenet.py), generators."""
from datafree_jax.models import imagenet
from datafree_jax.models.classifiers import CLASSIFIERS, UnknownModelError, get_classifier
from datafree_jax.models.generators import Generator
from datafree_jax.models.layers import BN_EXAMPLE_MOMENTS, BN_INPUTS, RecordingBatchNorm
