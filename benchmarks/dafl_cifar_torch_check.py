"""DAFL at the paper's CIFAR-10 setting: this project's JAX step against the authors' PyTorch code.

    pip install torch==2.13.0        # the reference only: not a dependency of the package
    python benchmarks/dafl_cifar_torch_check.py [--batch=8] [--steps=3] [--schedule_steps=5]

The setting is configs/cifar10.py with method=dafl (ResNet-34 teacher, ResNet-18 student,
generator of latent size 1000 and width 128, w_oh 0.05 / w_ie 5 / w_a 0.01, Adam lr 0.02 for
the generator, SGD lr 0.1 momentum 0.9 weight decay 5e-4 with the x0.1 / x0.01 step schedule
for the student) at a small batch. The PyTorch side transcribes the authors' release
(huawei-noah/Efficient-Computing, Data-Efficient-Model-Compression/DAFL): the Generator class
and the training loop of DAFL-train.py, and resnet.py's CIFAR ResNets. The teacher is a randomly
initialised ResNet-34 (its BatchNorm statistics and affine parameters randomised, so that their
mapping is exercised) used in evaluation mode; generator and student are the JAX stage's initial
ones (stages/dafl.py `build`). Every Flax weight is copied into the PyTorch modules by name (a
one-to-one mapping: no parameter left out on either side), and both sides use the latents of the
JAX step, `jax.random.normal(common.step_key(seed, dafl.STAGE_SALT, step), (batch, 1000))`.

Compared, from identical weights and latents:
1. one step: the generated images, the teacher's logits and features, every generator loss term
   (l_oh, l_a, l_ie, total) and the KD loss, and the relative difference
   ||g_jax - g_torch|| / ||g_torch|| of every generator and student gradient. The JAX side is
   the stage's own building blocks (`dafl.generator_dafl_loss`, `common.student_kd_loss`);
   the PyTorch side is the authors' single backward of generator loss + KD loss.
2. --steps steps: the JAX stage's jitted step (`step(state, None)` of `dafl.build`) against
   the authors' loop (Adam for the generator, SGD with PyTorch weight decay for the student, the
   learning rate set per step by the authors' `adjust_learning_rate`): the loss metrics of every
   step, then every parameter and BatchNorm running statistic after the last step. The student's
   step count is set to --schedule_steps so that the step schedule's first drop (x0.1 at 40%)
   falls inside the compared steps.

Prints a table (quantity, largest absolute and relative difference, tolerance, pass/fail) and
exits with status 1 when a checked row fails. Rows marked 'info' have no tolerance: they show a
known structural difference (listed below the table).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

try:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
except ImportError:
  if __name__ == "__main__":
    sys.exit("this benchmark needs PyTorch: pip install torch==2.13.0")
  raise

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from datafree_jax import common, config_lib, input_pipeline, models  # pylint: disable=g-import-not-at-top,wrong-import-position
from datafree_jax.stages import dafl  # pylint: disable=g-import-not-at-top,wrong-import-position

nn = torch.nn

# Tolerances of the issue: loss terms to 1e-5, gradients to 1e-4 relative.
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
# Per-channel conv biases directly before a training-mode BatchNorm: the BN removes them, so
# their exact gradient is 0 and both sides return rounding noise. They are checked against the
# size of the whole generator gradient instead (see `one_step_rows`).
BN_CANCELLED = ("conv1/bias", "conv2/bias")


# ---------------------------------------------------------------------------------------------
# The authors' modules (DAFL-train.py's Generator, resnet.py's BasicBlock / ResNet), transcribed.
# ---------------------------------------------------------------------------------------------

class AuthorsGenerator(nn.Module):
  """DAFL-train.py's Generator; opt.img_size, opt.latent_dim, opt.channels as arguments."""

  def __init__(self, img_size=32, latent_dim=1000, channels=3):
    super().__init__()
    self.init_size = img_size // 4
    self.l1 = nn.Sequential(nn.Linear(latent_dim, 128 * self.init_size**2))
    self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(128))
    self.conv_blocks1 = nn.Sequential(
        nn.Conv2d(128, 128, 3, stride=1, padding=1),
        nn.BatchNorm2d(128, 0.8),
        nn.LeakyReLU(0.2, inplace=True),
    )
    self.conv_blocks2 = nn.Sequential(
        nn.Conv2d(128, 64, 3, stride=1, padding=1),
        nn.BatchNorm2d(64, 0.8),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(64, channels, 3, stride=1, padding=1),
        nn.Tanh(),
        nn.BatchNorm2d(channels, affine=False),
    )

  def forward(self, z):
    out = self.l1(z)
    out = out.view(out.shape[0], 128, self.init_size, self.init_size)
    img = self.conv_blocks0(out)
    img = nn.functional.interpolate(img, scale_factor=2)
    img = self.conv_blocks1(img)
    img = nn.functional.interpolate(img, scale_factor=2)
    img = self.conv_blocks2(img)
    return img


class AuthorsBasicBlock(nn.Module):
  """resnet.py's BasicBlock."""
  expansion = 1

  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != self.expansion * planes:
      self.shortcut = nn.Sequential(
          nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride,
                    bias=False),
          nn.BatchNorm2d(self.expansion * planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    out += self.shortcut(x)
    out = F.relu(out)
    return out


class AuthorsResNet(nn.Module):
  """resnet.py's ResNet (CIFAR: 3x3 stem, no max-pool, avg_pool2d(4), `out_feature`)."""

  def __init__(self, block, num_blocks, num_classes=10):
    super().__init__()
    self.in_planes = 64
    self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
    self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
    self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
    self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
    self.linear = nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block, planes, num_blocks, stride):
    strides = [stride] + [1] * (num_blocks - 1)
    layers = []
    for s in strides:
      layers.append(block(self.in_planes, planes, s))
      self.in_planes = planes * block.expansion
    return nn.Sequential(*layers)

  def forward(self, x, out_feature=False):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layer1(out)
    out = self.layer2(out)
    out = self.layer3(out)
    out = self.layer4(out)
    out = F.avg_pool2d(out, 4)
    feature = out.view(out.size(0), -1)
    out = self.linear(feature)
    if not out_feature:
      return out
    return out, feature


def authors_resnet18(num_classes=10):
  return AuthorsResNet(AuthorsBasicBlock, [2, 2, 2, 2], num_classes)


def authors_resnet34(num_classes=10):
  return AuthorsResNet(AuthorsBasicBlock, [3, 4, 6, 3], num_classes)


def authors_kdloss(y, teacher_scores):
  """DAFL-train.py's kdloss; `size_average=False` (deprecated) is `reduction='sum'`."""
  p = F.log_softmax(y, dim=1)
  q = F.softmax(teacher_scores, dim=1)
  return F.kl_div(p, q, reduction="sum") / y.shape[0]


class AuthorsDAFL:
  """The authors' CIFAR training loop (DAFL-train.py) around given modules.

  Optimisers as in the script's CIFAR branch: Adam(lr_G) for the generator (PyTorch's default
  betas, which the config also has), SGD(lr_S, momentum 0.9, weight_decay 5e-4) for the
  student. adjust_learning_rate sets the student's rate per epoch: lr_S below 800 of the 2000
  epochs, 0.1 lr_S below 1600, then 0.01 lr_S. With one iteration per "epoch" and
  n_epochs = total steps, that is x0.1 at 40% and x0.01 at 80% of the steps.
  """

  def __init__(self, config, teacher, generator, student):
    g, s = config.generator, config.student
    self.cfg = config
    self.teacher, self.generator, self.net = teacher, generator, student
    self.teacher.eval()
    self.criterion = torch.nn.CrossEntropyLoss()
    self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=g.lr)
    self.optimizer_s = torch.optim.SGD(self.net.parameters(), lr=s.lr, momentum=0.9,
                                       weight_decay=5e-4)
    self.n_epochs = s.steps
    self.iteration = 0

  def adjust_learning_rate(self, epoch, learning_rate):
    """The authors' rule with 800 / 1600 of 2000 epochs as 40% / 80% of n_epochs."""
    if epoch < 0.4 * self.n_epochs:
      lr = learning_rate
    elif epoch < 0.8 * self.n_epochs:
      lr = 0.1 * learning_rate
    else:
      lr = 0.01 * learning_rate
    for param_group in self.optimizer_s.param_groups:
      param_group["lr"] = lr

  def forward_backward(self, z):
    """The loop body up to loss.backward(): (gen_imgs, outputs_T, features_T, losses)."""
    c = self.cfg.generator
    self.adjust_learning_rate(self.iteration, self.cfg.student.lr)
    self.net.train()
    self.optimizer_g.zero_grad()
    self.optimizer_s.zero_grad()
    gen_imgs = self.generator(z)
    outputs_t, features_t = self.teacher(gen_imgs, out_feature=True)
    pred = outputs_t.data.max(1)[1]
    loss_activation = -features_t.abs().mean()
    loss_one_hot = self.criterion(outputs_t, pred)
    softmax_o_t = torch.nn.functional.softmax(outputs_t, dim=1).mean(dim=0)
    loss_information_entropy = (softmax_o_t * torch.log10(softmax_o_t)).sum()
    loss = loss_one_hot * c.w_oh + loss_information_entropy * c.w_ie + loss_activation * c.w_a
    loss_g = loss.item()
    loss_kd = authors_kdloss(self.net(gen_imgs.detach()), outputs_t.detach())
    loss += loss_kd
    loss.backward()
    terms = {"l_oh": loss_one_hot.item(), "l_a": loss_activation.item(),
             "l_ie": loss_information_entropy.item(), "loss_g": loss_g,
             "loss_kd": loss_kd.item()}
    return gen_imgs.detach(), outputs_t.detach(), features_t.detach(), terms

  def optimizer_steps(self):
    self.optimizer_g.step()
    self.optimizer_s.step()
    self.iteration += 1


# ---------------------------------------------------------------------------------------------
# Flax <-> PyTorch weights, by name.
# ---------------------------------------------------------------------------------------------

_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var"}
_GEN_MODULES = {"fc": "l1.0", "bn0": "conv_blocks0.0", "conv1": "conv_blocks1.0",
                "bn1": "conv_blocks1.1", "conv2": "conv_blocks2.0", "bn2": "conv_blocks2.1",
                "conv_out": "conv_blocks2.3", "bn_out": "conv_blocks2.5"}
_RESNET_INNER = {"conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2",
                 "shortcut_conv": "shortcut.0", "shortcut_bn": "shortcut.1"}


def torch_name(path, generator: bool) -> str:
  """PyTorch state_dict name of the Flax leaf at `path` (a tuple of names)."""
  *mods, leaf = path
  if generator:
    (mod,) = mods
    return f"{_GEN_MODULES[mod]}.{_LEAF[leaf]}"
  if mods[0].startswith("stage"):
    stage, block = mods[0].split("_block")
    inner = _RESNET_INNER[mods[1]]
    return f"layer{int(stage[5:])}.{int(block) - 1}.{inner}.{_LEAF[leaf]}"
  (mod,) = mods
  return f"{ {'stem_conv': 'conv1', 'stem_bn': 'bn1', 'head': 'linear'}[mod]}.{_LEAF[leaf]}"


def _flat(tree):
  """{('a', 'b', 'leaf'): array} of a nested dict."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[tuple(k.key for k in path)] = np.asarray(leaf)
  return out


def _unflat(flat):
  out = {}
  for path, leaf in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return out


def _gen_fc_perm(x, width, to_torch: bool):
  """Reorders the generator's Dense outputs (last axis): Flax (h, w, c) <-> PyTorch (c, h, w)."""
  lead = x.shape[:-1]
  s = int(round(math.sqrt(x.shape[-1] // width)))
  if to_torch:
    x = np.moveaxis(x.reshape(lead + (s, s, width)), -1, len(lead))
  else:
    x = np.moveaxis(x.reshape(lead + (width, s, s)), len(lead), -1)
  return x.reshape(lead + (-1,))


def flax_to_torch_array(path, x, gen_width=0):
  """A Flax leaf in the layout of the corresponding PyTorch tensor."""
  x = np.asarray(x, np.float32)
  if gen_width and path[0] == "fc":
    x = _gen_fc_perm(x, gen_width, to_torch=True)
  if path[-1] == "kernel":
    x = np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else x.T
  return np.ascontiguousarray(x)


def torch_to_flax_array(path, t, gen_width=0):
  """A PyTorch tensor (weight, gradient, buffer) in the corresponding Flax leaf's layout."""
  x = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
  if path[-1] == "kernel":
    x = np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else x.T
  if gen_width and path[0] == "fc":
    x = _gen_fc_perm(x, gen_width, to_torch=False)
  return np.ascontiguousarray(x)


def load_into_torch(module, params, batch_stats, generator=False, gen_width=0):
  """Copies Flax params and batch_stats into `module`; every parameter and running statistic
  of `module` must be covered and every Flax leaf must have a target."""
  targets = dict(module.named_parameters())
  targets.update({k: v for k, v in module.named_buffers() if not k.endswith("num_batches_tracked")})
  done = set()
  with torch.no_grad():
    for tree in (params, batch_stats):
      for path, x in _flat(tree).items():
        name = torch_name(path, generator)
        t = targets[name]
        src = torch.from_numpy(flax_to_torch_array(path, x, gen_width))
        if tuple(src.shape) != tuple(t.shape):
          raise ValueError(f"{'/'.join(path)} -> {name}: shape {tuple(src.shape)} vs "
                           f"{tuple(t.shape)}")
        t.copy_(src)
        done.add(name)
  missing = sorted(set(targets) - done)
  if missing:
    raise ValueError(f"PyTorch tensors without a Flax source: {missing}")


def torch_tree(module, like, generator=False, gen_width=0, grads=False):
  """The Flax-layout pytree of `like`'s structure read from `module` (its .grad with grads)."""
  tensors = dict(module.named_parameters())
  tensors.update(dict(module.named_buffers()))
  out = {}
  for path in _flat(like):
    t = tensors[torch_name(path, generator)]
    out[path] = torch_to_flax_array(path, t.grad if grads else t, gen_width)
  return _unflat(out)


# ---------------------------------------------------------------------------------------------
# The setting.
# ---------------------------------------------------------------------------------------------

def cifar_config(batch: int, schedule_steps: int, seed: int = 0):
  """configs/cifar10.py (method dafl) with the student's batch and step count changed."""
  config = config_lib.load_config_file(os.path.join(REPO, "configs", "cifar10.py"),
                                       f"method=dafl,seed={seed}")
  config.student.batch_size = batch
  config.student.steps = schedule_steps
  return config


def random_teacher(config, info, seed: int):
  """A randomly initialised teacher of the config's model (ResNet-34), in the dict form that
  `dafl.build` takes. Its BN running statistics and affine parameters are drawn at random
  (mean ~ N(0, 0.1^2), var ~ U(0.5, 2), scale ~ U(0.8, 1.2), bias ~ N(0, 0.1^2))."""
  model = models.get_classifier(config.teacher.model, info.num_classes, config.teacher.width)
  params, bs = common.init_model(model, jax.random.key(seed), info.image_shape)
  rng = np.random.default_rng(seed)
  params, bs = _flat(params), _flat(bs)
  for path in params:
    if "bn" in path[-2]:
      shape = params[path].shape
      params[path] = (rng.uniform(0.8, 1.2, shape) if path[-1] == "scale"
                      else rng.normal(0.0, 0.1, shape)).astype(np.float32)
  for path in bs:
    shape = bs[path].shape
    bs[path] = (rng.normal(0.0, 0.1, shape) if path[-1] == "mean"
                else rng.uniform(0.5, 2.0, shape)).astype(np.float32)
  variables = {"params": _unflat(params), "batch_stats": _unflat(bs)}
  return {"model": model, "variables": jax.tree.map(jnp.asarray, variables), "bn_stats": {},
          "meta": {"model": config.teacher.model}}


class Setting:
  """Both implementations from the same weights: the JAX stage (`build`) and the authors' loop."""

  def __init__(self, batch=8, schedule_steps=5, seed=0, threads=0):
    if threads:
      torch.set_num_threads(threads)
    self.config = cifar_config(batch, schedule_steps, seed)
    g, s = self.config.generator, self.config.student
    if (g.width, g.num_upsample, g.style) != (128, 2, "dafl"):
      raise ValueError("the authors' generator has width 128 and two upsamplings")
    if (s.optimizer, g.optimizer, s.temperature) != ("sgd", "adam", 1.0):
      raise ValueError("the authors' CIFAR loop: SGD student, Adam generator, KD at T=1")
    self.info = input_pipeline.dataset_info("cifar10")
    self.teacher = random_teacher(self.config, self.info, seed + 100)
    state, self.step, self.student, self.gen, _ = dafl.build(self.config, self.teacher,
                                                             self.info)
    # The jitted step donates its state: keep a host copy of the initial one.
    self.state0 = jax.device_get(state)
    self.state = state
    self.t_teacher = authors_resnet34(self.info.num_classes)
    load_into_torch(self.t_teacher, self.teacher["variables"]["params"],
                    self.teacher["variables"]["batch_stats"])
    for p in self.t_teacher.parameters():
      p.requires_grad_(False)   # frozen: the authors' loop never steps it either
    self.t_gen = AuthorsGenerator(self.info.image_size, g.latent_dim, self.info.channels)
    load_into_torch(self.t_gen, self.state0["gen"]["params"], self.state0["gen"]["batch_stats"],
                    generator=True, gen_width=g.width)
    self.t_student = authors_resnet18(self.info.num_classes)
    load_into_torch(self.t_student, self.state0["student"]["params"],
                    self.state0["student"]["batch_stats"])
    self.authors = AuthorsDAFL(self.config, self.t_teacher, self.t_gen, self.t_student)
    self.bn_count = _bn_sample_counts(self.t_gen, self.t_student)
    self._pieces = jax.jit(self._jax_pieces)

  def latents(self, step: int):
    """The JAX step's latents of step `step` (0-based)."""
    key = common.step_key(self.config.seed, dafl.STAGE_SALT, step)
    return jax.random.normal(key, (self.config.student.batch_size,
                                   self.config.generator.latent_dim))

  def _jax_pieces(self, gp, gbs, sp, sbs, z):
    """dafl_step's two gradients, from the stage's building blocks."""
    gcfg, scfg = self.config.generator, self.config.student
    (loss_g, (images, logits, new_gbs, terms)), g_grads = jax.value_and_grad(
        dafl.generator_dafl_loss, argnums=4, has_aux=True)(
            self.gen, self.teacher["model"], self.teacher["variables"], gcfg, gp, gbs, z)
    _, feats, _ = common.teacher_forward(self.teacher["model"], self.teacher["variables"],
                                         images)
    (kd, new_sbs), s_grads = jax.value_and_grad(common.student_kd_loss, argnums=1,
                                                has_aux=True)(
        self.student, sp, sbs, jax.lax.stop_gradient(images), jax.lax.stop_gradient(logits),
        scfg.temperature)
    return {"images": images, "logits": logits, "features": feats,
            "terms": dict(terms, loss_g=loss_g, loss_kd=kd), "g_grads": g_grads,
            "s_grads": s_grads, "gen_bs": new_gbs, "student_bs": new_sbs}

  def jax_pieces(self, z):
    s0 = self.state0
    return jax.device_get(self._pieces(s0["gen"]["params"], s0["gen"]["batch_stats"],
                                       s0["student"]["params"], s0["student"]["batch_stats"], z))


def _bn_sample_counts(*modules):
  """{BatchNorm module: values per channel in its last batch} (filled during forward)."""
  counts = {}

  def hook(mod, inputs):
    x = inputs[0]
    counts[mod] = x.numel() // x.shape[1]

  for m in modules:
    for sub in m.modules():
      if isinstance(sub, nn.BatchNorm2d):
        sub.register_forward_pre_hook(hook)
  return counts


# ---------------------------------------------------------------------------------------------
# Comparisons.
# ---------------------------------------------------------------------------------------------

def _nchw_to_nhwc(t):
  return np.ascontiguousarray(t.detach().cpu().numpy().transpose(0, 2, 3, 1))


def _diff(a, b):
  """(largest |a - b|, ||a - b|| / ||b||) in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b))), float(np.linalg.norm(a - b) / max(np.linalg.norm(b),
                                                                         1e-30))


def _row(quantity, a, b, tol=None, kind="rel"):
  """A table row. kind 'rel': pass when ||a - b|| / ||b|| <= tol; 'loss': pass when
  |a - b| <= tol * max(1, |b|); tol None: information only."""
  ab, rel = _diff(a, b)
  if tol is None:
    ok = None
  elif kind == "loss":
    ok = ab <= tol * max(1.0, float(np.max(np.abs(b))))
  else:
    ok = rel <= tol
  return {"quantity": quantity, "abs": ab, "rel": rel, "tol": tol, "kind": kind, "ok": ok}


def _leaf_rows(label, ours, theirs, tol, per_leaf: bool, skip=()):
  """Per-leaf rows of two Flax-layout pytrees (all leaves, or the worst one and a summary)."""
  a, b = _flat(ours), _flat(theirs)
  rows = [_row(f"{label} {'/'.join(p)}", a[p], b[p], tol) for p in sorted(b)
          if "/".join(p) not in skip]
  if per_leaf or len(rows) <= 10:
    return rows
  worst = max(rows, key=lambda r: r["rel"])
  worst = dict(worst, quantity=f"{label}: worst of {len(rows)} leaves ("
               f"{worst['quantity'][len(label) + 1:]})")
  worst["abs"] = max(r["abs"] for r in rows)
  worst["ok"] = all(r["ok"] for r in rows) if tol is not None else None
  return [worst]


def one_step_rows(setting: Setting, per_leaf=False):
  """Rows comparing the first step's images, losses and gradients (nothing is updated)."""
  z = setting.latents(0)
  j = setting.jax_pieces(z)
  a = setting.authors
  # The forward pass below updates PyTorch's running statistics: put them back afterwards, so
  # that steps_rows starts from the same state as the JAX step.
  saved = [(m, copy.deepcopy(m.state_dict())) for m in (a.generator, a.net)]
  images_t, logits_t, feats_t, terms_t = a.forward_backward(torch.from_numpy(np.asarray(z)))
  width = setting.config.generator.width
  rows = [
      _row("generated images", j["images"], _nchw_to_nhwc(images_t), GRAD_TOL),
      _row("teacher logits", j["logits"], logits_t.numpy(), GRAD_TOL),
      _row("teacher features (512-d)", j["features"], feats_t.numpy(), GRAD_TOL),
  ]
  for k in ("l_oh", "l_a", "l_ie", "loss_g", "loss_kd"):
    rows.append(_row(f"loss {k}", j["terms"][k], terms_t[k], LOSS_TOL, kind="loss"))
  gp = setting.state0["gen"]["params"]
  g_t = torch_tree(a.generator, gp, generator=True, gen_width=width, grads=True)
  rows += _leaf_rows("grad G", j["g_grads"], g_t, GRAD_TOL, True, skip=BN_CANCELLED)
  # Biases removed by the following BN: compare both (noise) to the whole gradient's size.
  scale = max(np.sqrt(sum(float(np.sum(np.square(x))) for x in _flat(g_t).values())), 1e-30)
  for name in BN_CANCELLED:
    path = tuple(name.split("/"))
    r = _row(f"grad G {name} (BN-cancelled: ||g|| / ||grad G||, both sides)",
             _flat(j["g_grads"])[path], _flat(g_t)[path], GRAD_TOL)
    r["rel"] = max(np.linalg.norm(_flat(j["g_grads"])[path]),
                   np.linalg.norm(_flat(g_t)[path])) / scale
    r["ok"] = r["rel"] <= GRAD_TOL
    rows.append(r)
  s_t = torch_tree(a.net, setting.state0["student"]["params"], grads=True)
  rows += _leaf_rows("grad S", j["s_grads"], s_t, GRAD_TOL, per_leaf)
  a.optimizer_g.zero_grad()
  a.optimizer_s.zero_grad()
  for m, sd in saved:
    m.load_state_dict(sd)
  return rows, j, terms_t


def _biased_running_var(setting, module, like, prev_t, prev_fix, generator):
  """PyTorch's running variances with each update's unbiased batch variance turned biased:
  v_fix = (1-m) v_fix_prev + (v_torch - (1-m) v_torch_prev) * (n-1)/n, n values per channel."""
  bns = dict(module.named_modules())
  out = {}
  for path, v in _flat(torch_tree(module, like, generator=generator)).items():
    if path[-1] != "var":
      out[path] = v
      continue
    name = torch_name(path, generator).rsplit(".", 1)[0]
    mod = bns[name]
    n, m = setting.bn_count[mod], mod.momentum
    out[path] = (1 - m) * prev_fix[path] + (v - (1 - m) * prev_t[path]) * (n - 1) / n
  return out


def steps_rows(setting: Setting, steps: int, per_leaf=False):
  """Rows comparing `steps` joint steps of the JAX stage and of the authors' loop."""
  a = setting.authors
  width = setting.config.generator.width
  s0 = setting.state0
  gen_bs_like, st_bs_like = s0["gen"]["batch_stats"], s0["student"]["batch_stats"]
  prev_t = {"G": _flat(gen_bs_like), "S": _flat(st_bs_like)}
  fixed = {"G": dict(prev_t["G"]), "S": dict(prev_t["S"])}
  rows, state = [], setting.state
  for i in range(steps):
    state, metrics = setting.step(state, None)
    metrics = jax.device_get(metrics)
    _, _, _, terms_t = a.forward_backward(torch.from_numpy(np.asarray(setting.latents(i))))
    a.optimizer_steps()
    for k in ("l_oh", "l_a", "l_ie", "loss_g", "loss_kd"):
      rows.append(_row(f"step {i + 1} (jitted step) loss {k}", metrics[k], terms_t[k],
                       LOSS_TOL, kind="loss"))
    for key, mod, like, gen in (("G", a.generator, gen_bs_like, True),
                                ("S", a.net, st_bs_like, False)):
      cur = _flat(torch_tree(mod, like, generator=gen))
      fixed[key] = _biased_running_var(setting, mod, like, prev_t[key], fixed[key], gen)
      prev_t[key] = cur
  setting.state = state
  state = jax.device_get(state)
  after = f"after {steps} steps:"
  gen_t = torch_tree(a.generator, s0["gen"]["params"], generator=True, gen_width=width)
  rows += _leaf_rows(f"{after} G param", state["gen"]["params"], gen_t, PARAM_TOL_G, True,
                     skip=BN_CANCELLED)
  for name in BN_CANCELLED:   # Adam turns their noise gradients into +-lr steps: no effect.
    path = tuple(name.split("/"))
    rows.append(_row(f"{after} G param {name} (BN-cancelled, no effect on G)",
                     _flat(state["gen"]["params"])[path], _flat(gen_t)[path]))
  st_t = torch_tree(a.net, s0["student"]["params"])
  rows += _leaf_rows(f"{after} S param", state["student"]["params"], st_t, PARAM_TOL_S, per_leaf)
  for key, label, ours, like, mod, gen in (
      ("G", "G", state["gen"]["batch_stats"], gen_bs_like, a.generator, True),
      ("S", "S", state["student"]["batch_stats"], st_bs_like, a.net, False)):
    raw = torch_tree(mod, like, generator=gen)
    means = {p: v for p, v in _flat(ours).items() if p[-1] == "mean"}
    varis = {p: v for p, v in _flat(ours).items() if p[-1] == "var"}
    rows += _leaf_rows(f"{after} {label} BN running mean", _unflat(means),
                       _unflat({p: _flat(raw)[p] for p in means}), STAT_TOL, False)
    rows += _leaf_rows(f"{after} {label} BN running var, as stored (PyTorch: unbiased)",
                       _unflat(varis), _unflat({p: _flat(raw)[p] for p in varis}), None, False)
    rows += _leaf_rows(f"{after} {label} BN running var, PyTorch's turned biased",
                       _unflat(varis), _unflat({p: fixed[key][p] for p in varis}), STAT_TOL,
                       False)
  # The function: both generators after the steps, on fresh latents.
  z = jax.random.normal(jax.random.key(777), (setting.config.student.batch_size,
                                              setting.config.generator.latent_dim))
  imgs_j, _ = common.generate(setting.gen, state["gen"]["params"], state["gen"]["batch_stats"],
                              z)
  with torch.no_grad():
    imgs_t = a.generator(torch.from_numpy(np.asarray(z)))
  rows.append(_row(f"{after} G images on new latents", imgs_j, _nchw_to_nhwc(imgs_t),
                   PARAM_TOL_G))
  return rows


# After steps: the student (SGD) stays within float rounding; the generator's Adam first steps
# are lr * g / (|g| + eps) ~ lr * sign(g) per element, so an element whose gradient is within
# rounding of 0 can step either way: a few such elements per leaf at most.
PARAM_TOL_S = 1e-5
PARAM_TOL_G = 1e-3
STAT_TOL = 1e-5


def format_table(rows) -> str:
  lines = ["| quantity | max abs diff | rel diff | tolerance | result |",
           "|---|---|---|---|---|"]
  for r in rows:
    if r["tol"] is None:
      tol, res = "-", "info"
    else:
      tol = (f"{r['tol']:.0e} abs (rel if |x|>1)" if r["kind"] == "loss"
             else f"{r['tol']:.0e} rel")
      res = "pass" if r["ok"] else "FAIL"
    lines.append(f"| {r['quantity']} | {r['abs']:.2e} | {r['rel']:.2e} | {tol} | {res} |")
  return "\n".join(lines)


STRUCTURAL_NOTES = """\
Known structural differences between the authors' code and this project (same function unless
said otherwise):
- Upsampling: the authors upsample (F.interpolate, nearest x2) and then convolve; the Flax
  generator computes nearest x2 + Conv3x3 as one low-resolution convolution with a phase-summed
  kernel and a depth-to-space reshape (models/generators.py UpsampleConv). Same function and
  parameters; the sums are ordered differently (float rounding only).
- Generator Dense output order: Flax reshapes to (h, w, c), the authors view as (c, h, w): the
  weights are permuted when copied (no effect on the function).
- BatchNorm running variance: PyTorch updates it with the unbiased batch variance (x n/(n-1)),
  Flax nn.BatchNorm with the biased one. Training-mode outputs and gradients are unaffected;
  the stored statistics differ (rows 'as stored'), and agree once PyTorch's update is turned
  biased. Only the student's statistics are ever used (evaluation); at batch 1024 the factor is
  at most 1 + 1/16383 (ResNet-18's last stage, 4x4).
- Flax BatchNorm computes the batch variance as E[x^2] - E[x]^2 (use_fast_variance); PyTorch
  uses a two-pass form: float rounding only.
- The BN-cancelled conv biases (generator conv1/conv2, before eps-0.8 BatchNorms) have an exact
  gradient of 0: both sides return rounding noise, which Adam scales to ~lr-sized steps of
  arbitrary sign; they have no effect on the generator's output.
- The authors wrap teacher, generator and student in nn.DataParallel: on several GPUs each
  replica's BatchNorm normalises its own slice of the batch; the JAX step (and this check, and
  the authors' code on one GPU) normalises over the whole batch.
- Not compared here: the authors' loop keeps the student with the best test accuracy (test-set
  selection); this project reports the final student."""


def run(batch=8, steps=3, schedule_steps=5, seed=0, per_leaf=False, threads=0):
  """All rows of the check (one-step comparison, then `steps` joint steps)."""
  setting = Setting(batch, schedule_steps, seed, threads)
  rows, _, _ = one_step_rows(setting, per_leaf)
  if steps:
    rows += steps_rows(setting, steps, per_leaf)
  return setting, rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=3, help="joint steps of part 2 (0: skip)")
  p.add_argument("--schedule_steps", type=int, default=5,
                 help="the student's total steps (its step schedule's boundaries are 40%% and "
                      "80%% of them)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--per_leaf", action="store_true", help="a row for every student leaf")
  p.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: its default)")
  args = p.parse_args()
  setting, rows = run(args.batch, args.steps, args.schedule_steps, args.seed, args.per_leaf,
                      args.threads)
  lrs = [setting.config.student.lr * f for f in (
      1.0 if i < 0.4 * args.schedule_steps else 0.1 if i < 0.8 * args.schedule_steps else 0.01
      for i in range(args.steps))]
  print(f"CIFAR-10 DAFL (configs/cifar10.py, method dafl), batch {args.batch}, seed {args.seed};"
        f" teacher {setting.config.teacher.model} (random, eval mode), student "
        f"{setting.config.student.model}, latent {setting.config.generator.latent_dim}; student "
        f"lr per step {lrs}; jax {jax.__version__} ({jax.devices()[0].platform}), torch "
        f"{torch.__version__}\n")
  print(format_table(rows))
  print()
  print(STRUCTURAL_NOTES)
  failed = [r["quantity"] for r in rows if r["ok"] is False]
  print(f"\n{len(rows) - len(failed)} of {len(rows)} rows pass or are information only"
        + (f"; FAILED: {failed}" if failed else ""))
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
