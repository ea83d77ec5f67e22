r"""CIFAR-100 (tfds 'cifar100'): DAFL's ResNet-34 -> ResNet-18, official settings, and the pairs
of zju-vipa/DataFree's benchmark.

    python -m datafree_jax.main --config=configs/cifar100.py --config.data_dir=$TFDS_DATA_DIR
    python -m datafree_jax.main --config=configs/cifar100.py:pair=vgg11_resnet18 \
        --config.teacher.init_from=checkpoints/pretrained/cifar100_vgg11.pth

Arguments: method = dafl | kd_data | kd_noise | teacher | ...; seed; stage; pair; g_steps
(method=fast).
Published (Chen et al. 2019): teacher 77.84, DAFL student 74.47 (users of the official code
report 53-62%).

pair: as in cifar10.py (the same models and settings, their zoo's cifar100_<teacher>.pth files).
zju-vipa/DataFree's README's CIFAR-100 accuracies:

    pair               T. scratch  S. scratch  DAFL   DeepInv  CMI
    resnet34_resnet18  78.05       77.10       74.47  61.32    77.04
    vgg11_resnet18     71.32       77.01       57.29  54.13    70.56
    wrn40_2_wrn16_1    75.83       65.31       22.50  53.77    57.91
    wrn40_2_wrn40_1    75.83       72.19       34.66  61.33    68.88
    wrn40_2_wrn16_2    75.83       73.56       40.00  61.34    68.75

One difference from the official scripts: they normalise CIFAR-100 with CIFAR-10's mean/std;
here every dataset is normalised with its own (datasets.DATASETS), which is what a
teacher brought from elsewhere expects. The two differ by a fixed per-channel affine map of the
input, which the teacher's first convolution and BN absorb in training.
zju-vipa/DataFree normalises CIFAR-100 with its own statistics, within 0.0002 of these.

method=deepinversion takes cifar10.deepinversion_settings (published: 61.32%), method=cmi
cifar10.cmi_settings (published: 77.04%), method=fast (g_steps = 2 | 5 | 10)
cifar10.fast_settings (published: 69.76 / 72.82 / 74.34%).
"""
from datafree_jax.configs import cifar10


def get_config(arg=None):
  return cifar10.cifar_config("cifar100", arg, weights=(0.5, 20.0, 0.1))
