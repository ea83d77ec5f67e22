"""DAFL in JAX against the official DAFL loop in PyTorch, on the same mnist5k teachers.

    pip install torch==2.13.0        # the reference only: not a dependency of the package
    python benchmarks/dafl_torch_reference.py --seeds=0,1,2,3,4,5,6,7,8,9 --teacher_seed=0 \
        --workdir=/tmp/dafl_parity

The mnist5k LeNet-5 teacher is trained, or reused from --workdir/seed<k>/teacher_only as
benchmarks/mnist5k_table.py leaves it (k: each DAFL seed's own, or --teacher_seed for all of
them), and copied into a PyTorch LeNet-5. Then:

1. Agreement (the first seed only): from the JAX loop's initial generator and student and the
   latents of its first step, one DAFL step in each implementation: the generator's loss terms,
   and the relative difference ||g_jax - g_torch|| / ||g_torch|| of every generator and student
   gradient. The same again after --check_after steps of the PyTorch loop, its weights copied
   into JAX (saturated generator, trained student).
2. Training: DAFL for the config's student.steps (or --steps) with both, for every seed. PyTorch
   runs the authors' loop (DAFL-train.py: one backward of generator loss + KD loss, then both
   Adam steps, latents from torch.randn); JAX runs this project's jitted step (stages/dafl.py).
   With --init=jax (the default) the PyTorch generator and student start from the JAX stage's
   initial weights of the same seed, so the two differ only in their latents and float
   rounding; --init=own keeps PyTorch's default initialisation. Same hyperparameters
   (configs/mnist5k.py, `--set` overrides), including the student's learning-rate schedule.
   Prints the student's test accuracy every --eval_every steps, the final one per seed, mean +-
   std over seeds and, with both implementations, Welch's t-test of the finals.

Both implementations compute the same step (part 1); the spread of part 2 over seeds is the
spread of DAFL itself at this size.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
except ImportError:
  sys.exit("this benchmark needs PyTorch: pip install torch==2.13.0")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from datafree_jax import common, input_pipeline, losses, train  # pylint: disable=g-import-not-at-top,wrong-import-position
from datafree_jax.stages import dafl, teacher as teacher_stage  # pylint: disable=g-import-not-at-top,wrong-import-position
from mnist5k_table import get_config  # pylint: disable=g-import-not-at-top,wrong-import-position

nn = torch.nn
LENET5 = (6, 16, 120, 84)
LENET5_HALF = (3, 8, 60, 42)
BIASES_BEFORE_BN = {("conv1", "bias"), ("conv2", "bias")}


class TorchLeNet5(nn.Module):
  """DAFL's lenet.py: conv5-relu-pool, conv5-relu-pool, conv5-relu (features), fc-relu, fc."""

  def __init__(self, widths, num_classes=10):
    super().__init__()
    c1, c2, c3, f4 = widths
    self.conv1, self.conv2 = nn.Conv2d(1, c1, 5), nn.Conv2d(c1, c2, 5)
    self.conv3 = nn.Conv2d(c2, c3, 5)
    self.fc1, self.fc2 = nn.Linear(c3, f4), nn.Linear(f4, num_classes)

  def forward(self, x, out_feature=False):
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    feature = F.relu(self.conv3(x)).flatten(1)
    out = self.fc2(F.relu(self.fc1(feature)))
    return (out, feature) if out_feature else out


class TorchGenerator(nn.Module):
  """DAFL's Generator (DAFL-train.py) with the width, latent size and image size as arguments."""

  def __init__(self, width, latent_dim, image_size, channels):
    super().__init__()
    self.init_size, self.width = image_size // 4, width
    self.l1 = nn.Sequential(nn.Linear(latent_dim, width * self.init_size ** 2))
    self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(width))
    self.conv_blocks1 = nn.Sequential(nn.Conv2d(width, width, 3, stride=1, padding=1),
                                      nn.BatchNorm2d(width, 0.8), nn.LeakyReLU(0.2))
    self.conv_blocks2 = nn.Sequential(
        nn.Conv2d(width, width // 2, 3, stride=1, padding=1), nn.BatchNorm2d(width // 2, 0.8),
        nn.LeakyReLU(0.2), nn.Conv2d(width // 2, channels, 3, stride=1, padding=1), nn.Tanh(),
        nn.BatchNorm2d(channels, affine=False))

  def forward(self, z):
    out = self.l1(z).view(z.shape[0], self.width, self.init_size, self.init_size)
    img = F.interpolate(self.conv_blocks0(out), scale_factor=2)
    img = F.interpolate(self.conv_blocks1(img), scale_factor=2)
    return self.conv_blocks2(img)


# Parameter correspondence: JAX (module, name) <-> PyTorch attribute path.
def _gen_pairs(g):
  return {("bn0", "scale"): g.conv_blocks0[0].weight, ("bn0", "bias"): g.conv_blocks0[0].bias,
          ("conv1", "kernel"): g.conv_blocks1[0].weight, ("conv1", "bias"): g.conv_blocks1[0].bias,
          ("bn1", "scale"): g.conv_blocks1[1].weight, ("bn1", "bias"): g.conv_blocks1[1].bias,
          ("conv2", "kernel"): g.conv_blocks2[0].weight, ("conv2", "bias"): g.conv_blocks2[0].bias,
          ("bn2", "scale"): g.conv_blocks2[1].weight, ("bn2", "bias"): g.conv_blocks2[1].bias,
          ("conv_out", "kernel"): g.conv_blocks2[3].weight,
          ("conv_out", "bias"): g.conv_blocks2[3].bias,
          ("fc", "kernel"): g.l1[0].weight, ("fc", "bias"): g.l1[0].bias}


def _lenet_pairs(m):
  out = {}
  for n in ("conv1", "conv2", "conv3", "fc1", "fc2"):
    out[(n, "kernel")], out[(n, "bias")] = getattr(m, n).weight, getattr(m, n).bias
  return out


def to_torch(key, x, gen_width=0):
  """A JAX parameter as the corresponding PyTorch tensor's layout."""
  x = np.asarray(x)
  if key[0] == "fc" and gen_width:   # Dense output (h, w, c) <-> Linear output (c, h, w)
    s = int(round(math.sqrt(x.shape[-1] // gen_width)))
    lead = x.shape[:-1]
    x = x.reshape(lead + (s, s, gen_width))
    x = np.moveaxis(x, -1, len(lead))
    x = x.reshape(lead + (-1,))
  if key[1] == "kernel":
    x = np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else x.T
  return torch.tensor(np.ascontiguousarray(x), dtype=torch.float32)


def to_jax(key, t, gen_width=0):
  """A PyTorch tensor (parameter or gradient) in the corresponding JAX parameter's layout."""
  x = t.detach().numpy()
  if key[1] == "kernel":
    x = np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else x.T
  if key[0] == "fc" and gen_width:
    s = int(round(math.sqrt(x.shape[-1] // gen_width)))
    lead = x.shape[:-1]
    x = x.reshape(lead + (gen_width, s, s))
    x = np.moveaxis(x, len(lead), -1)
    x = x.reshape(lead + (-1,))
  return np.ascontiguousarray(x)


def load_into_torch(pairs, params, gen_width=0):
  with torch.no_grad():
    for key, t in pairs.items():
      t.copy_(to_torch(key, params[key[0]][key[1]], gen_width))


def params_from_torch(pairs, gen_width=0):
  out = {}
  for key, t in pairs.items():
    out.setdefault(key[0], {})[key[1]] = jnp.asarray(to_jax(key, t, gen_width))
  return out


class TorchDAFL:
  """The authors' joint loop: generator loss + KD loss, one backward, both Adam steps."""

  def __init__(self, config, teacher, info):
    g, s = config.generator, config.student
    self.g_cfg = g
    self.teacher = teacher
    self.gen = TorchGenerator(g.width, g.latent_dim, info.image_size, info.channels)
    self.student = TorchLeNet5(LENET5_HALF, info.num_classes)
    self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=g.lr, betas=(g.b1, g.b2))
    self.opt_s = torch.optim.Adam(self.student.parameters(), lr=s.lr)
    total = s.steps
    factor = {"constant": lambda i: 1.0,
              "cosine": lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total))}
    self.sched_s = torch.optim.lr_scheduler.LambdaLR(self.opt_s, factor[s.schedule])

  def step(self, z, update=True):
    c = self.g_cfg
    self.opt_g.zero_grad()
    self.opt_s.zero_grad()
    self.student.train()
    gen_imgs = self.gen(z)
    outputs_t, features_t = self.teacher(gen_imgs, out_feature=True)
    pred = outputs_t.data.max(1)[1]
    loss_activation = -features_t.abs().mean()
    loss_one_hot = F.cross_entropy(outputs_t, pred)
    softmax_o_t = F.softmax(outputs_t, dim=1).mean(dim=0)
    loss_information_entropy = (softmax_o_t * torch.log10(softmax_o_t)).sum()
    loss = loss_one_hot * c.w_oh + loss_information_entropy * c.w_ie + loss_activation * c.w_a
    s_logits = self.student(gen_imgs.detach())
    loss_kd = F.kl_div(F.log_softmax(s_logits, dim=1), F.softmax(outputs_t.detach(), dim=1),
                       reduction="sum") / s_logits.shape[0]
    (loss + loss_kd).backward()
    if update:
      self.opt_g.step()
      self.opt_s.step()
      self.sched_s.step()
    return gen_imgs, {"l_oh": loss_one_hot.item(), "l_a": loss_activation.item(),
                      "l_ie": loss_information_entropy.item(), "loss_kd": loss_kd.item()}


def torch_teacher(teacher, info):
  model = TorchLeNet5(LENET5, info.num_classes)
  load_into_torch(_lenet_pairs(model), jax.device_get(teacher["variables"]["params"]))
  model.eval()
  for p in model.parameters():
    p.requires_grad_(False)
  return model


def torch_accuracy(model, images_nchw, labels):
  with torch.no_grad():
    return (model(images_nchw).argmax(1) == labels).float().mean().item()


def rel_diff(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def agreement(config, teacher, info, t_teacher, check_after: int):
  """Rows (when, quantity, value) comparing one step of both implementations."""
  state, _, student, gen, _ = dafl.build(config, teacher, info)
  ref = TorchDAFL(config, t_teacher, info)
  width = config.generator.width
  load_into_torch(_gen_pairs(ref.gen), jax.device_get(state["gen"]["params"]), width)
  load_into_torch(_lenet_pairs(ref.student), jax.device_get(state["student"]["params"]))
  gbs = state["gen"]["batch_stats"]
  rows = []

  @jax.jit
  def jax_grads(gp, sp, z, images_t):
    def gl(p):
      return dafl.generator_dafl_loss(gen, teacher["model"], teacher["variables"],
                                      config.generator, p, gbs, z)
    (_, (images, _, _, terms)), g_grads = jax.value_and_grad(gl, has_aux=True)(gp)
    t_logits = teacher["model"].apply(teacher["variables"], images_t)

    def sl(p):
      return losses.kd_loss(t_logits, student.apply({"params": p}, images_t, train=True),
                            config.student.temperature)
    kd, s_grads = jax.value_and_grad(sl)(sp)
    return images, dict(terms, loss_kd=kd), g_grads, s_grads

  def compare(when, z):
    images_t, t_terms = ref.step(torch.tensor(np.asarray(z)), update=False)
    gp = params_from_torch(_gen_pairs(ref.gen), width)
    sp = params_from_torch(_lenet_pairs(ref.student))
    images_t_nhwc = jnp.asarray(images_t.detach().numpy().transpose(0, 2, 3, 1))
    images, terms, g_grads, s_grads = jax_grads(gp, sp, z, images_t_nhwc)
    rows.append((when, "generated images, largest absolute difference",
                 f"{float(jnp.max(jnp.abs(images - images_t_nhwc))):.1e}"))
    for k in ("l_oh", "l_a", "l_ie", "loss_kd"):
      rows.append((when, f"{k}: jax / torch", f"{float(terms[k]):.6f} / {t_terms[k]:.6f}"))
    for name, grads, pairs, w in (("generator", g_grads, _gen_pairs(ref.gen), width),
                                  ("student", s_grads, _lenet_pairs(ref.student), 0)):
      diffs = {f"{a}.{b}": rel_diff(grads[a][b], to_jax((a, b), t.grad, w))
               for (a, b), t in pairs.items() if (a, b) not in BIASES_BEFORE_BN}
      worst = max(diffs, key=diffs.get)
      rows.append((when, f"{name} gradient, largest relative difference",
                   f"{diffs[worst]:.1e} ({worst})"))
    # Per-channel biases right before a BatchNorm are removed by it: gradient 0 up to rounding.
    largest = max(max(float(jnp.max(jnp.abs(g_grads[a][b]))),
                      float(t.grad.abs().max())) for (a, b), t in _gen_pairs(ref.gen).items()
                  if (a, b) in BIASES_BEFORE_BN)
    rows.append((when, "conv1, conv2 biases (a BatchNorm follows: gradient 0 up to rounding), "
                 "largest absolute gradient, both", f"{largest:.1e}"))

  z0 = jax.random.normal(common.step_key(config.seed, dafl.STAGE_SALT, 0),
                         (config.student.batch_size, config.generator.latent_dim))
  compare("step 1 (same init)", z0)
  torch.manual_seed(config.seed)
  for _ in range(check_after):
    ref.step(torch.randn(config.student.batch_size, config.generator.latent_dim))
  z1 = jax.random.normal(jax.random.key(12345), z0.shape)
  compare(f"after {check_after} PyTorch steps", z1)
  return rows


TORCH, JAX = "PyTorch (authors' loop)", "JAX (stages/dafl.py)"


def train_both(config, teacher, info, t_teacher, test, test_torch, eval_every: int, impls,
               init: str = "jax"):
  """{impl: ([(step, accuracy)], seconds per step)} for PyTorch and/or JAX.

  test_torch: the test split as (NCHW images, labels) tensors; init: 'jax' (PyTorch starts from
  the JAX stage's initial weights) or 'own' (PyTorch's default initialisation).
  """
  out = {}
  if "torch" in impls:
    out[TORCH] = _train_torch(config, teacher, t_teacher, info, test_torch, eval_every, init)
  if "jax" in impls:
    out[JAX] = _train_jax(config, teacher, info, test, eval_every)
  return out


def _timed_steps(steps: int, step, accuracy, eval_every: int, label: str):
  """Runs step() `steps` times: ([(step, accuracy())], seconds per step, the first excluded)."""
  curve, elapsed = [], 0.0
  for i in range(steps):
    t = time.perf_counter()
    step()
    elapsed += time.perf_counter() - t if i else 0.0
    if (i + 1) % eval_every == 0 or i + 1 == steps:
      curve.append((i + 1, accuracy()))
      print(f"  {label} step {i + 1}: student {curve[-1][1]:.2%}", flush=True)
  return curve, elapsed / max(steps - 1, 1)


def _train_torch(config, teacher, t_teacher, info, test_torch, eval_every, init):
  torch.manual_seed(config.seed)
  ref = TorchDAFL(config, t_teacher, info)
  if init == "jax":  # the JAX stage's initial generator and student of this seed
    state = dafl.build(config, teacher, info)[0]
    load_into_torch(_gen_pairs(ref.gen), jax.device_get(state["gen"]["params"]),
                    config.generator.width)
    load_into_torch(_lenet_pairs(ref.student), jax.device_get(state["student"]["params"]))
  return _timed_steps(
      config.student.steps,
      lambda: ref.step(torch.randn(config.student.batch_size, config.generator.latent_dim)),
      lambda: torch_accuracy(ref.student, *test_torch), eval_every, "PyTorch")


def _train_jax(config, teacher, info, test, eval_every):
  state, step_jit, student, _, mesh = dafl.build(config, teacher, info)
  eval_fn = common.make_classifier_eval(student, lambda s: s["student"], {"test": test}, mesh)
  box = {"state": state}

  def step():
    box["state"], _ = step_jit(box["state"], None)
    jax.block_until_ready(box["state"])
  return _timed_steps(config.student.steps, step,
                      lambda: float(eval_fn(box["state"])["accuracy"]), eval_every, "JAX")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--workdir", default="/tmp/mnist5k_table",
                 help="where the teachers are (or are trained), as in mnist5k_table.py")
  p.add_argument("--steps", type=int, default=0, help="DAFL steps (0: the config's)")
  p.add_argument("--eval_every", type=int, default=250)
  p.add_argument("--check_after", type=int, default=300,
                 help="PyTorch steps before the second agreement check")
  p.add_argument("--skip_training", action="store_true", help="agreement check only")
  p.add_argument("--impls", default="torch,jax",
                 help="implementations to train: torch, jax or both (the JAX runs are the "
                      "DAFL rows of mnist5k_table.py with the same seeds and settings)")
  p.add_argument("--init", choices=("jax", "own"), default="jax",
                 help="PyTorch's initial weights: the JAX stage's of the same seed, or its own")
  p.add_argument("--teacher_seed", type=int, default=-1,
                 help="train (or reuse) one teacher with this seed for every DAFL seed; "
                      "-1: each seed its own teacher")
  p.add_argument("--set", action="append", default=[], help="config override key=value")
  args = p.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  torch.set_num_threads(os.cpu_count() or 1)
  test = input_pipeline.load_dataset("mnist5k", "test")
  info = test.info
  test_torch = (torch.tensor(np.ascontiguousarray(test.images.transpose(0, 3, 1, 2))),
                torch.tensor(test.labels.astype(np.int64)))
  results = {}
  for n, seed in enumerate(seeds):
    tseed = seed if args.teacher_seed < 0 else args.teacher_seed
    teacher_dir = os.path.join(args.workdir, f"seed{tseed}", "teacher_only")
    tconfig = get_config(f"method=teacher,seed={tseed}", args.set)
    summary = train.train_and_evaluate(tconfig, teacher_dir)
    config = get_config(f"method=dafl,seed={seed}", args.set)
    if (config.teacher.model, config.student.model) != ("lenet5", "lenet5_half"):
      p.error("the PyTorch reference has the LeNet-5 teacher and LeNet-5-half student only")
    if (config.student.temperature != 1.0 or config.generator.optimizer != "adam"
        or config.student.optimizer != "adam"
        or config.student.schedule not in ("constant", "cosine")):
      p.error("the PyTorch reference is the authors' MNIST loop: KD at temperature 1, Adam for "
              "both, a constant or cosine student schedule")
    if args.steps:
      config.student.steps = args.steps
    teacher = teacher_stage.load(config, teacher_dir, info)
    t_teacher = torch_teacher(teacher, info)
    t_acc = torch_accuracy(t_teacher, *test_torch)
    print(f"seed {seed}: teacher (seed {tseed}) {summary['teacher']['test_accuracy']:.2%} (JAX), "
          f"{t_acc:.2%} (its PyTorch copy)", flush=True)
    if n == 0:
      rows = agreement(config, teacher, info, t_teacher, args.check_after)
      print("\n| when | quantity | value |\n|---|---|---|")
      for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
      print(flush=True)
    if not args.skip_training:
      results[seed] = train_both(config, teacher, info, t_teacher, test, test_torch,
                                 args.eval_every, args.impls.split(","), args.init)
  if not results:
    return
  print(f"\nmnist5k DAFL, {config.student.steps} steps, generator width "
        f"{config.generator.width}, batch {config.student.batch_size}, lr_G "
        f"{config.generator.lr}, student schedule {config.student.schedule}, PyTorch init "
        f"{args.init}, teacher seed {'each' if args.teacher_seed < 0 else args.teacher_seed}; "
        f"{jax.devices()[0].platform}, torch {torch.__version__} ({torch.get_num_threads()} "
        "threads)")
  first = next(iter(results.values()))
  print("| implementation | seed | student accuracy % at steps " + " / ".join(
      str(s) for s, _ in next(iter(first.values()))[0]) + " | final % | s/step |")
  print("|---|---|---|---|---|")
  finals = {}
  for impl in first:
    finals[impl] = []
    for seed, res in results.items():
      curve, sps = res[impl]
      finals[impl].append(curve[-1][1] * 100)
      print(f"| {impl} | {seed} | {' / '.join(f'{a * 100:.1f}' for _, a in curve)} | "
            f"{finals[impl][-1]:.2f} | {sps:.3f} |")
    print(f"| {impl} | mean +- std (n = {len(finals[impl])}) | | {np.mean(finals[impl]):.2f} "
          f"+- {np.std(finals[impl]):.2f} | |")
  if len(finals) == 2 and len(seeds) > 1:
    t, p_value, dof = welch(finals[JAX], finals[TORCH])
    print(f"\nWelch's t-test, JAX - PyTorch finals: difference of means "
          f"{np.mean(finals[JAX]) - np.mean(finals[TORCH]):+.2f} points, t = {t:.3f}, "
          f"{dof:.1f} degrees of freedom, two-sided p = {p_value:.3f}")


def welch(a, b):
  """Welch's unequal-variance t-test of mean(a) - mean(b): (t, two-sided p, degrees of freedom)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  res = stats.ttest_ind(np.asarray(a, np.float64), np.asarray(b, np.float64), equal_var=False)
  return float(res.statistic), float(res.pvalue), float(res.df)


if __name__ == "__main__":
  main()
