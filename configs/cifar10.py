r"""DAFL on CIFAR-10 (tfds 'cifar10'): ResNet-34 teacher -> ResNet-18 student, official settings.

    python -m datafree_jax.main --config=configs/cifar10.py --config.data_dir=$TFDS_DATA_DIR

Arguments: method = dafl | kd_data | kd_noise | teacher; seed; stage.
Published (Chen et al. 2019): teacher 95.58, DAFL student 92.22. 240,000 steps of batch 1024:
an accelerator job. The teacher recipe is the official script's: SGD 0.1, momentum 0.9, weight
decay 5e-4, lr / 10 at epochs 80 and 120 of 200, random crops padded with 4 black pixels and
horizontal flips.

method=deepinversion (Yin et al. 2020, Adaptive DeepInversion, as zju-vipa/DataFree runs it):
see deepinversion_settings below.
"""
from datafree_jax import config_lib


def cifar_config(dataset: str, arg, weights):
  a = config_lib.parse_arg(arg, method="dafl", seed=0, stage="all")
  c = config_lib.base_config()
  c.dataset = dataset
  c.method, c.seed, c.stage = a.method, a.seed, a.stage
  c.teacher.model = "resnet34"
  c.teacher.steps = 78200           # 200 epochs of 50,000 at batch 128.
  c.teacher.batch_size = 128
  c.teacher.optimizer = "sgd"
  c.teacher.lr = 0.1
  c.teacher.momentum = 0.9
  c.teacher.weight_decay = 5e-4
  c.teacher.schedule = "step"
  c.teacher.boundaries = (0.4, 0.6)  # lr / 10 at epochs 80 and 120.
  c.teacher.augment_shift = 4
  c.teacher.augment_flip = True
  c.teacher.eval_every = 3910
  c.student.model = "resnet18"
  c.student.steps = 240000          # 2000 epochs x 120 iterations.
  c.student.batch_size = 1024
  c.student.optimizer = "sgd"
  c.student.lr = 0.1
  c.student.momentum = 0.9
  c.student.weight_decay = 5e-4
  c.student.schedule = "step"       # x0.1 at 40%, x0.01 at 80%.
  c.student.eval_every = 12000
  c.generator.latent_dim = 1000
  c.generator.width = 128
  c.generator.lr = 0.02
  c.generator.w_oh, c.generator.w_ie, c.generator.w_a = weights
  c.checkpoint_every = 2000
  if a.method == "deepinversion":
    deepinversion_settings(c)
  return c


def deepinversion_settings(c):
  """method=deepinversion: zju-vipa/DataFree's CIFAR settings (scripts/deepinv/; the synthesis
  settings are config.deepinversion's defaults, see stages/deepinversion.py): 200 rounds of
  256 images x 1,000 Adam iterations (lr 0.1); the student SGD 0.1, momentum 0.9, weight decay
  1e-4, cosine, batch 256, KD temperature 20, random crops (pad 4) and flips, 400 steps per
  round for the competing student and 200 x 400 for the final one. Published (the benchmark's
  table, ResNet-34 -> ResNet-18): CIFAR-10 93.26%, CIFAR-100 61.32%."""
  s = c.student
  s.steps = 80000                   # 200 rounds x 400 steps
  s.batch_size = 256
  s.optimizer, s.lr, s.momentum, s.weight_decay = "sgd", 0.1, 0.9, 1e-4
  s.schedule = "cosine"
  s.temperature = 20.0
  s.augment_shift, s.augment_flip = 4, True
  s.eval_every = 4000
  d = c.deepinversion
  d.rounds, d.batch_size, d.iterations, d.kd_steps = 200, 256, 1000, 400
  d.eval_every, d.checkpoint_every = 10, 5


def get_config(arg=None):
  return cifar_config("cifar10", arg, weights=(0.05, 5.0, 0.01))
