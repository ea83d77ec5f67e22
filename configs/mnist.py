r"""DAFL on full MNIST (tfds 'mnist'), the paper's setting and official hyperparameters.

    python -m datafree_jax.main --config=configs/mnist.py --config.data_dir=$TFDS_DATA_DIR
    python -m datafree_jax.main --config=configs/mnist.py:model=hinton

Arguments: model = lenet5 (LeNet-5 -> LeNet-5-half, default) | hinton (HintonNet 1200-1200 ->
800-800); method = dafl | ensemble | kd_data | kd_noise | teacher; seed; stage.
method=ensemble (Luo et al.: BN moment matching), method=deepinversion (its BN regulariser),
method=cmi (the same, and its features of BN inputs) and method=fast (its BN regulariser) take
the LeNet-5 pair with BatchNorm (lenet5_bn -> lenet5_half_bn); HintonNet has no BatchNorm layers
to match.
Published (Chen et al. 2019): teacher 98.91 / 98.39, DAFL student 98.20 / 97.91 (LeNet / Hinton).
24,000 DAFL steps of batch 512: an accelerator job (see benchmarks/dafl_step_speed.py).
"""
from datafree_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, model="lenet5", method="dafl", seed=0, stage="all")
  config_lib.check_choice("model", a.model, ("lenet5", "hinton"))
  bn_method = a.method in ("ensemble", "deepinversion", "cmi", "fast")
  if bn_method and a.model != "lenet5":
    raise config_lib.ConfigError(
        f"method={a.method} matches the teacher's BatchNorm statistics and needs model=lenet5 "
        f"(LeNet-5 with BN); {a.model!r} has no BatchNorm layers")
  c = config_lib.base_config()
  c.dataset = "mnist"
  c.method, c.seed, c.stage = a.method, a.seed, a.stage
  c.teacher.model = "lenet5_bn" if bn_method else a.model
  # The official teacher script: Adam 1e-3, constant, 9 epochs of 235 batches of 256.
  c.teacher.steps = 2115
  c.teacher.batch_size = 256
  c.teacher.optimizer = "adam"
  c.teacher.lr = 1e-3
  c.teacher.schedule = "constant"
  c.teacher.eval_every = 1000
  c.student.model = {"lenet5": "lenet5_half", "hinton": "hinton_half",
                     "lenet5_bn": "lenet5_half_bn"}[c.teacher.model]
  c.student.steps = 24000           # 200 epochs x 120 iterations.
  c.student.batch_size = 512
  c.student.optimizer = "adam"
  c.student.lr = 2e-3
  c.student.eval_every = 1200
  c.generator.latent_dim = 100
  c.generator.width = 128
  c.generator.lr = 0.2
  c.generator.w_oh, c.generator.w_ie, c.generator.w_a = 1.0, 5.0, 0.1
  c.checkpoint_every = 1000
  return c
