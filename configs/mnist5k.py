r"""mnist5k: the embedded 5,000 real MNIST digits (4,000 train / 1,000 test), offline default.

    python -m datafree_jax.main                              # = this config, method=ensemble
    python -m datafree_jax.main --config=mnist5k:method=dafl
    python -m datafree_jax.main --config=mnist5k:method=kd_noise,seed=1

Arguments (`:k=v,k=v`):
  method   ensemble (default: Luo et al.'s per-class generators, the method that is robust at
           this size) | dafl (its student's accuracy swings widely with the seed here) |
           deepinversion (20 rounds of 128 images x 200 iterations, a competing student 20
           steps a round, then 1,500 student steps on the 2,560 images) |
           cmi (20 rounds of 128 images x 100 generator iterations, a competing student 20
           steps a round, then 1,500 student steps on the 2,560 images) |
           fast (Fast-DFKD: 40 rounds of 10 generator steps on 128 images, 40 student steps
           per round after 2 rounds of warmup) | kd_data | kd_noise | teacher
  seed     0
  stage    all | teacher | train (everything after the teacher) | generators | distill | fast
  teacher  lenet5 (default) | lenet5_bn (the default for method=ensemble, deepinversion, cmi
           and fast: their BN terms need a teacher with BatchNorm)
  quick    method=ensemble's short setting (the default before 2026-12-03): 150 generator
           steps, then 800 student steps at temperature 1 on the generated images as drawn;
           about half the time, a student about 3 points further below its teacher
  long     accepted for earlier commands: method=ensemble's setting without `quick`, the
           default

The defaults are the paper's MNIST settings at a smaller generator width (16 instead of 128, a
sixteenth of the compute). method=ensemble: 10 per-class generators of width 16, batch 32
each, target-class CE + class-conditional BN moment matching (w_mm 1), 600 generator steps,
then 2,400 student steps at temperature 4 on generated images shifted by up to 2 px: within 2
points of the teacher (3 seeds). What they reach, and how long they take, is measured in
benchmarks/RESULTS.md (DAFL's student varies widely with the seed; the ensemble's does not).
"""
from datafree_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, method="ensemble", seed=0, stage="all", teacher="",
                           long=False, quick=False)
  if not a.teacher:
    a.teacher = ("lenet5_bn" if a.method in ("ensemble", "deepinversion", "cmi", "fast")
                 else "lenet5")
  c = config_lib.base_config()
  c.dataset = "mnist5k"
  c.method = a.method
  c.seed = a.seed
  c.stage = a.stage

  c.teacher.model = a.teacher
  c.teacher.steps = 2500            # 80 epochs of 4,000 images at batch 128.
  c.teacher.batch_size = 128
  c.teacher.optimizer = "adam"
  c.teacher.lr = 1e-3
  c.teacher.schedule = "cosine"
  c.teacher.augment_shift = 2       # random +-2 px shifts
  c.teacher.eval_every = 500

  c.student.model = "lenet5_half_bn" if a.teacher.endswith("_bn") else "lenet5_half"
  c.student.steps = 800
  c.student.batch_size = 256
  c.student.optimizer = "adam"
  c.student.lr = 2e-3
  c.student.schedule = "cosine"
  c.student.eval_every = 250

  c.generator.latent_dim = 100
  c.generator.width = 16            # the paper's 128 costs ~16x the compute.
  c.generator.lr = 0.2
  c.generator.w_oh = 1.0
  c.generator.w_a = 0.1
  c.generator.w_ie = 5.0
  if (a.long or a.quick) and a.method != "ensemble":
    raise config_lib.ConfigError(f"mnist5k's {'long' if a.long else 'quick'}=True is a setting "
                                 "of method=ensemble")
  if a.long and a.quick:
    raise config_lib.ConfigError("mnist5k: long=True and quick=True contradict each other")
  if a.method == "ensemble" and not a.quick:
    c.ensemble.steps = 600
    c.student.steps = 2400
    c.student.temperature = 4.0
    c.student.augment_shift = 2
  if a.method in ("deepinversion", "cmi"):
    p = c[a.method]                  # (the section exists once the method is registered)
    p.rounds = 20                    # 20 rounds of 128 images: a pool of 2,560
    p.batch_size = 128
    p.flip = False                   # MNIST digits are not left-right symmetric: no flips
    p.kd_steps = 20                  # the competing student's steps per round
    p.eval_every = 5
    c.student.steps = 1500           # the final student, on the finished pool
    c.student.temperature = 4.0
    c.student.augment_shift = 2
  if a.method == "deepinversion":
    d = c.deepinversion
    d.iterations = 200
    d.jitter = 2                     # random rolls of up to 2 px
  if a.method == "cmi":
    m = c.cmi                        # the authors' losses and weights, smaller rounds
    m.iterations = 100
    m.lr = 1e-2
    m.width = 32                     # ngf 16: an eighth of the authors' generator width
    m.latent_dim = 64
    m.bank_size = 2560               # every round's features
    m.n_neg = 1024
    m.head_dim = 64
    m.crop_pad = 2                   # the global view: shifts of up to 2 px
  if a.method == "fast":
    f = c.fast
    f.rounds, f.warmup, f.iterations, f.batch_size = 40, 2, 10, 128
    f.latent_dim, f.width = 100, 32
    f.lr_g, f.lr_z = 5e-3, 0.015     # Fast-2's rates: above Fast-10's here (benchmarks/RESULTS.md)
    f.reset_fc_round = 0
    f.augment_shift, f.augment_flip = 2, False   # digits are not left-right symmetric
    f.kd_steps = 40
    f.eval_every, f.checkpoint_every = 10, 10
    c.student.temperature = 4.0
    c.student.augment_shift = 2
  return c
