r"""CIFAR-10 (tfds 'cifar10'): DAFL's ResNet-34 -> ResNet-18, official settings, and the
teacher/student pairs of zju-vipa/DataFree's benchmark.

    python -m datafree_jax.main --config=configs/cifar10.py --config.data_dir=$TFDS_DATA_DIR
    python -m datafree_jax.main --config=configs/cifar10.py:pair=wrn40_2_wrn16_1 \
        --config.teacher.init_from=checkpoints/pretrained/cifar10_wrn40_2.pth

Arguments: method = dafl | kd_data | kd_noise | teacher | ...; seed; stage; pair (below);
g_steps (method=fast).
Published (Chen et al. 2019): teacher 95.58, DAFL student 92.22. 240,000 steps of batch 1024:
an accelerator job. The teacher recipe is the official script's: SGD 0.1, momentum 0.9, weight
decay 5e-4, lr / 10 at epochs 80 and 120 of 200, random crops padded with 4 black pixels and
horizontal flips.

pair = teacher_student, the five CIFAR pairs of zju-vipa/DataFree's tables (their README's
CIFAR-10 accuracies: teacher and student trained on the data, then the student by DAFL,
DeepInversion and CMI; docs/teacher_import.md has the model names):

    pair               teacher   student   T. scratch  S. scratch  DAFL   DeepInv  CMI
    resnet34_resnet18  resnet34  resnet18  95.70       95.20       92.22  93.26    94.84
    vgg11_resnet18     vgg11_bn  resnet18  92.25       95.20       81.10  90.36    91.13
    wrn40_2_wrn16_1    wrn40_2   wrn16_1   94.87       91.12       65.71  83.04    90.01
    wrn40_2_wrn40_1    wrn40_2   wrn40_1   94.87       93.94       81.33  86.85    92.78
    wrn40_2_wrn16_2    wrn40_2   wrn16_2   94.87       93.95       81.55  89.72    92.52

Their zoo's teachers (checkpoints/pretrained/<dataset>_<teacher>.pth, e.g. cifar10_wrn40_2.pth;
`vgg11` there is vgg11_bn here) load with --config.teacher.init_from=FILE; without init_from
the teacher is trained here first. pair=resnet34_resnet18 (the default) is DAFL's setting above
throughout. The other pairs take their settings from zju-vipa/DataFree's code:
  * teacher, when trained here (train_scratch.py's defaults and README command): SGD 0.1,
    momentum 0.9, weight decay 1e-4, batch 256, 200 epochs (39,200 steps), lr / 10 at epochs
    120, 150 and 180, random crops padded with 4 and horizontal flips;
  * student (datafree_kd.py, scripts/dafl/dafl_cifar10_wrn402_wrn161.sh, the one pair their
    scripts give): SGD 0.1, momentum 0.9, weight decay 1e-4, cosine decay over 200 epochs of
    400 steps of batch 256 (80,000 steps), KD at temperature 20;
  * DAFL's generator (the same script): Adam 1e-3 with betas (0.5, 0.999), latent size 512,
    weights one-hot 1, activation 0.001, balance 20 (their information entropy is in nats,
    ours in log10: w_ie = 20 ln 10). Their generator is a larger one (LargeGenerator) and takes
    one step per 5 student steps; here the DAFL stage's generator and loop are DAFL's own.

method=deepinversion (Yin et al. 2020, Adaptive DeepInversion, as zju-vipa/DataFree runs it):
see deepinversion_settings below.

method=cmi (Fang et al. 2021, as zju-vipa/CMI runs it): see cmi_settings below.

method=fast (Fang et al. 2022, Fast-DFKD, as zju-vipa/Fast-Datafree runs it): see
fast_settings below; g_steps = 2 | 5 | 10 (default) picks Fast-2, Fast-5 or Fast-10.
"""
import math

from datafree_jax import config_lib


# pair -> (teacher.model, student.model).
PAIRS = {"resnet34_resnet18": ("resnet34", "resnet18"), "vgg11_resnet18": ("vgg11_bn", "resnet18"),
         "wrn40_2_wrn16_1": ("wrn40_2", "wrn16_1"), "wrn40_2_wrn40_1": ("wrn40_2", "wrn40_1"),
         "wrn40_2_wrn16_2": ("wrn40_2", "wrn16_2")}


def cifar_config(dataset: str, arg, weights):
  a = config_lib.parse_arg(arg, method="dafl", seed=0, stage="all", pair="resnet34_resnet18",
                           g_steps=10)
  config_lib.Choice(tuple(PAIRS), label="pair", listing="pairs").check("pair", a.pair)
  if a.g_steps not in FAST_RATES:
    raise config_lib.ConfigError(f"g_steps={a.g_steps}: Fast-DFKD's published settings are for "
                                 f"g_steps {', '.join(map(str, FAST_RATES))}")
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
  if a.pair != "resnet34_resnet18":
    zju_pair(c, *PAIRS[a.pair])
  if a.method == "deepinversion":
    deepinversion_settings(c)
  if a.method == "cmi":
    cmi_settings(c)
  if a.method == "fast":
    fast_settings(c, PAIRS[a.pair][0], a.g_steps)
  return c


def zju_pair(c, teacher: str, student: str):
  """zju-vipa/DataFree's settings for a pair (module docstring)."""
  c.teacher.model, c.student.model = teacher, student
  c.teacher.steps = 39200           # 200 epochs of 196 batches of 256.
  c.teacher.batch_size = 256
  c.teacher.weight_decay = 1e-4
  c.teacher.boundaries = (0.6, 0.75, 0.9)  # lr / 10 at epochs 120, 150, 180.
  c.teacher.eval_every = 1960
  c.student.steps = 80000           # 200 epochs x 400 steps.
  c.student.batch_size = 256
  c.student.weight_decay = 1e-4
  c.student.schedule = "cosine"
  c.student.temperature = 20.0
  c.student.eval_every = 4000
  c.generator.latent_dim = 512
  c.generator.lr = 1e-3
  c.generator.b1 = 0.5
  c.generator.w_oh, c.generator.w_a = 1.0, 0.001
  c.generator.w_ie = 20.0 * math.log(10.0)


def zju_student(s, lr: float):
  """The student of zju-vipa's datafree_kd.py in their DeepInversion, CMI and Fast-DFKD CIFAR
  scripts (config.student `s`): SGD at `lr`, momentum 0.9, weight decay 1e-4, cosine decay over
  200 rounds x 400 steps (80,000), batch 256, KD temperature 20, random crops (pad 4) and
  flips."""
  s.steps = 80000                   # 200 rounds x 400 steps
  s.batch_size = 256
  s.optimizer, s.lr, s.momentum, s.weight_decay = "sgd", lr, 0.9, 1e-4
  s.schedule = "cosine"
  s.temperature = 20.0
  s.augment_shift, s.augment_flip = 4, True


def deepinversion_settings(c):
  """method=deepinversion: zju-vipa/DataFree's CIFAR settings (scripts/deepinv/; the synthesis
  settings are config.deepinversion's defaults, see stages/deepinversion.py): 200 rounds of
  256 images x 1,000 Adam iterations (lr 0.1); the student SGD 0.1, momentum 0.9, weight decay
  1e-4, cosine, batch 256, KD temperature 20, random crops (pad 4) and flips, 400 steps per
  round for the competing student and 200 x 400 for the final one. Published (the benchmark's
  table, ResNet-34 -> ResNet-18): CIFAR-10 93.26%, CIFAR-100 61.32%."""
  zju_student(c.student, lr=0.1)
  c.student.eval_every = 4000
  d = c.deepinversion
  d.rounds, d.batch_size, d.iterations, d.kd_steps = 200, 256, 1000, 400
  d.eval_every, d.checkpoint_every = 10, 5


# Fast-DFKD: g_steps -> (lr_g, lr_z); the teacher -> (w_adv, w_oh) (scripts/fast_cifar.sh).
FAST_RATES = {2: (5e-3, 0.015), 5: (3e-3, 0.01), 10: (2e-3, 0.01)}
FAST_WEIGHTS = {"resnet34": (1.33, 0.5), "vgg11_bn": (1.0, 0.5), "wrn40_2": (1.1, 0.4)}


def fast_settings(c, teacher: str, g_steps: int):
  """method=fast: zju-vipa/Fast-Datafree's CIFAR settings (scripts/fast_cifar.sh, the same for
  CIFAR-10 and CIFAR-100; the synthesis settings not set here are config.fast's defaults, see
  stages/fast_dfkd.py): 220 rounds, the first 20 synthesis only, g_steps inner steps on 256
  images per round (lr_g, lr_z by g_steps), w_adv and w_oh by teacher; the student SGD 0.2,
  momentum 0.9, weight decay 1e-4, cosine, batch 256, KD temperature 20, random crops (pad 4)
  and flips, 400 steps per round after warmup (80,000). Published (their README, ResNet-34 ->
  ResNet-18, Fast-2 / 5 / 10): CIFAR-10 92.62 / 93.63 / 94.05%, CIFAR-100 69.76 / 72.82 /
  74.34%."""
  zju_student(c.student, lr=0.2)    # 80,000 steps: (220 - 20) rounds x 400; not read by fast
  f = c.fast
  f.rounds, f.warmup, f.iterations, f.batch_size, f.kd_steps = 220, 20, g_steps, 256, 400
  f.lr_g, f.lr_z = FAST_RATES[g_steps]
  f.w_adv, f.w_oh = FAST_WEIGHTS[teacher]
  f.eval_every, f.checkpoint_every = 10, 10


def get_config(arg=None):
  return cifar_config("cifar10", arg, weights=(0.05, 5.0, 0.01))


def cmi_settings(c):
  """method=cmi: zju-vipa/CMI's CIFAR-10 script (scripts/cmi/cmi_cifar10.sh with
  datafree_kd.py; the synthesis settings are config.cmi's defaults, see stages/cmi.py): 200
  rounds of 256 images x 200 generator steps (Adam 1e-3, betas 0.5 / 0.999, the generator reset
  every round), w_bn 1, w_oh 1, w_adv 0.5, w_cr 0.8 at temperature 0.2, a memory bank of
  40,960 with 4,096 negatives; the student SGD 0.1, momentum 0.9, weight decay 1e-4, cosine,
  batch 256, KD temperature 20, random crops (pad 4) and flips, 400 steps per round for the
  competing student (the authors' student) and 200 x 400 for the final one. Published (their
  README): CIFAR-10 ResNet-34 -> ResNet-18 94.84%, CIFAR-100 77.04% (the other pairs in the
  module docstring). With the ResNet-34 teacher the 8,512 features of its 36 BN layers make the
  bank 40,960 x 17,024 floats (2.8 GB, replicated; WRN-40-2: 2,704 features, 0.9 GB)."""
  zju_student(c.student, lr=0.1)
  c.student.eval_every = 4000
  m = c.cmi
  m.rounds, m.batch_size, m.iterations, m.kd_steps = 200, 256, 200, 400
  m.eval_every, m.checkpoint_every = 10, 5
