r"""DAFL on CIFAR-100 (tfds 'cifar100'): ResNet-34 -> ResNet-18, official settings.

    python -m datafree_jax.main --config=configs/cifar100.py --config.data_dir=$TFDS_DATA_DIR

Arguments: method = dafl | kd_data | kd_noise | teacher; seed; stage.
Published (Chen et al. 2019): teacher 77.84, DAFL student 74.47 (users of the official code
report 53-62%).

One difference from the official scripts: they normalise CIFAR-100 with CIFAR-10's mean/std;
here every dataset is normalised with its own (datasets.DATASETS), which is what a
teacher brought from elsewhere expects. The two differ by a fixed per-channel affine map of the
input, which the teacher's first convolution and BN absorb in training.

method=deepinversion takes cifar10.deepinversion_settings (published: 61.32%).
"""
from datafree_jax.configs import cifar10


def get_config(arg=None):
  return cifar10.cifar_config("cifar100", arg, weights=(0.5, 20.0, 0.1))
