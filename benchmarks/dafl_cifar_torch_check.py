"""DAFL at the paper's CIFAR-10 setting: this project's JAX step against the authors' PyTorch code.

    pip install torch==2.13.0        # the reference only: not a dependency of the package
    python benchmarks/dafl_cifar_torch_check.py [--batch=8] [--steps=3] [--schedule_steps=5]

The setting is configs/cifar10.py with method=dafl (ResNet-34 teacher, ResNet-18 student,
generator of latent size 1000 and width 128, w_oh 0.05 / w_ie 5 / w_a 0.01, Adam lr 0.02 for
the generator, SGD lr 0.1 momentum 0.9 weight decay 5e-4 with the x0.1 / x0.01 step schedule
for the student) at a small batch. The PyTorch side transcribes the authors' release
(huawei-noah/Efficient-Computing, Data-Efficient-Model-Compression/DAFL): the Generator class,
kdloss and the CIFAR training loop of DAFL-train.py, and resnet.py's CIFAR ResNets. The teacher
is a random ResNet-34 (every parameter and BatchNorm running statistic drawn at random, so that
the whole weight mapping is exercised) used in evaluation mode; generator and student are the JAX
stage's initial ones (`dafl.build`). Every Flax leaf is copied into the PyTorch modules by name
(a one-to-one mapping: no tensor left out on either side), and both sides use the latents of the
JAX step, `jax.random.normal(common.step_key(seed, dafl.STAGE_SALT, step), (batch, 1000))`.

Two precisions, from the same weights:
- float64 (JAX under `jax.enable_x64`, weights and optimiser state cast; PyTorch `.double()`):
  the comparison of the two formulations. One step: generated images, teacher logits and
  features, every generator loss term (l_oh, l_a, l_ie, total) and the KD loss, the relative
  difference ||g_jax - g_torch|| / ||g_torch|| of every generator and student gradient (JAX:
  the stage's building blocks `dafl.generator_dafl_loss` and `common.student_kd_loss`; PyTorch:
  the authors' single backward of generator loss + KD loss). Then --steps steps of the stage's
  jitted step (`step(state, None)` of `dafl.build`) against the authors' loop (Adam for the
  generator, SGD with PyTorch's weight decay for the student, the learning rate set per step by
  the authors' adjust_learning_rate): the losses of every step, every parameter and BatchNorm
  running statistic after the last one, and both generators' images on new latents. The
  student's step count is --schedule_steps, so that the schedule's first drop (x0.1 at 40%)
  falls inside the compared steps.
- float32 (the precision the project trains in): the same one-step quantities, then the jitted
  float32 step's losses and gradient norms. Images, teacher outputs and losses agree to ~1e-7.
  Gradients through ReLU networks of this size are not smooth at float32 rounding: a relative
  input change of ~1e-6 flips a few of the teacher's (or the student's) ~10^7 ReLUs, and each
  flip moves a gradient leaf by up to ~1e-2 relative (the whole gradient by ~1e-3). Float32
  gradients therefore agree only to that level between any two implementations, the authors'
  code in float32 against itself in float64 included (rows 'vs PyTorch float64'); they are
  checked against a sanity bound (FLOAT32_GRAD_TOL) only. The steps after the first diverge,
  on both sides alike (Adam's first updates are ~lr * sign(g)): --divergence adds the authors'
  code in float32 against itself in float64 after the steps.

Prints a table (quantity, largest absolute and relative difference, tolerance, pass/fail) and
exits with status 1 when a checked row fails. Rows marked 'info' have no tolerance: they show a
known difference (explained below the table).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO, os.path.dirname(os.path.abspath(__file__))):
  if _path not in sys.path:
    sys.path.insert(0, _path)

try:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
except ImportError:
  if __name__ == "__main__":
    sys.exit("this benchmark needs PyTorch: pip install torch==2.13.0")
  raise

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from datafree_jax import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from datafree_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from datafree_jax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from datafree_jax.stages import dafl  # pylint: disable=g-import-not-at-top,wrong-import-position
import random_teachers  # pylint: disable=g-import-not-at-top,wrong-import-position

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


def flat(tree):
  """{('a', 'b', 'leaf'): numpy array} of a nested dict (Flax params / batch_stats)."""
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
  x = np.array(x)
  if gen_width and path[0] == "fc":
    x = _gen_fc_perm(x, gen_width, to_torch=True)
  if path[-1] == "kernel":
    x = np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else x.T
  return np.array(x, order="C")  # a writable copy, as torch.from_numpy wants


def torch_to_flax_array(path, t, gen_width=0):
  """A PyTorch tensor (weight, gradient, buffer) in the corresponding Flax leaf's layout."""
  x = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
  if path[-1] == "kernel":
    x = np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else x.T
  if gen_width and path[0] == "fc":
    x = _gen_fc_perm(x, gen_width, to_torch=False)
  return np.array(x, order="C")  # a copy: .numpy() shares memory with buffers updated in place


def load_into_torch(module, params, batch_stats, generator=False, gen_width=0):
  """Copies Flax params and batch_stats into `module`; every parameter and running statistic
  of `module` must be covered and every Flax leaf must have a target."""
  targets = dict(module.named_parameters())
  targets.update({k: v for k, v in module.named_buffers() if not k.endswith("num_batches_tracked")})
  done = set()
  with torch.no_grad():
    for tree in (params, batch_stats):
      for path, x in flat(tree).items():
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
  for path in flat(like):
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
  """A random teacher of the config's model (ResNet-34) in the dict form `dafl.build` takes
  (random_teachers.random_teacher: kernels ~ N(0, 1/fan_in), the head's bias ~ N(0, 0.1^2), BN
  scale ~ U(0.8, 1.2), offset ~ N(0, 0.1^2), running mean ~ N(0, 0.1^2), running var ~ U(0.5,
  2), drawn with numpy on the shapes of the Flax model: nothing is compiled)."""
  return random_teachers.random_teacher(config.teacher.model, info, seed, config.teacher.width)


def _cast(tree, dtype):
  """`tree` with its floating-point leaves as numpy arrays of `dtype`."""
  return jax.tree.map(
      lambda x: np.asarray(x, dtype) if np.issubdtype(np.asarray(x).dtype, np.floating)
      else np.asarray(x), tree)


class Setting:
  """The JAX stage built once (`dafl.build` on the CIFAR-10 config and a random teacher)."""

  def __init__(self, batch=8, schedule_steps=5, seed=0):
    self.config = cifar_config(batch, schedule_steps, seed)
    g, s = self.config.generator, self.config.student
    if (g.width, g.num_upsample, g.style) != (128, 2, "dafl"):
      raise ValueError("the authors' generator has width 128 and two upsamplings")
    if (s.optimizer, g.optimizer, s.temperature) != ("sgd", "adam", 1.0):
      raise ValueError("the authors' CIFAR loop: SGD student, Adam generator, KD at T=1")
    if (s.momentum, s.weight_decay, g.b1, g.b2, tuple(s.boundaries)) != (
        0.9, 5e-4, 0.9, 0.999, (0.4, 0.8)):
      raise ValueError("the authors' optimiser settings are momentum 0.9, weight decay 5e-4, "
                       "Adam's default betas, x0.1 at 40% and 80%")
    self.info = input_pipeline.dataset_info("cifar10")
    self.teacher = random_teacher(self.config, self.info, seed + 100)
    state, self.step, self.student, self.gen, _ = dafl.build(self.config, self.teacher,
                                                             self.info)
    self.state0 = jax.device_get(state)   # the jitted step donates its input state
    del state
    self.pieces_fn = jax.jit(self._jax_pieces)
    self.generate_fn = jax.jit(lambda p, bs, z: common.generate(self.gen, p, bs, z)[0])

  def _jax_pieces(self, teacher_vars, gp, gbs, sp, sbs, z):
    """dafl_step's two gradients, from the stage's building blocks."""
    gcfg, scfg = self.config.generator, self.config.student
    (loss_g, (images, logits, new_gbs, terms)), g_grads = jax.value_and_grad(
        dafl.generator_dafl_loss, argnums=4, has_aux=True)(
            self.gen, self.teacher["model"], teacher_vars, gcfg, gp, gbs, z)
    _, feats, _ = common.teacher_forward(self.teacher["model"], teacher_vars, images)
    (kd, new_sbs), s_grads = jax.value_and_grad(common.student_kd_loss, argnums=1,
                                                has_aux=True)(
        self.student, sp, sbs, jax.lax.stop_gradient(images), jax.lax.stop_gradient(logits),
        scfg.temperature)
    return {"images": images, "logits": logits, "features": feats,
            "terms": dict(terms, loss_g=loss_g, loss_kd=kd), "g_grads": g_grads,
            "s_grads": s_grads, "gen_bs": new_gbs, "student_bs": new_sbs}


class Variant:
  """Both implementations in one precision, from the Setting's initial weights.

  float64: JAX runs under `jax.enable_x64` (use `with variant.precision():` around every JAX
  call) on weights and optimiser state cast to float64; PyTorch's modules are `.double()`.
  """

  def __init__(self, setting: Setting, dtype=np.float32):
    self.setting, self.dtype = setting, np.dtype(dtype)
    self.torch_dtype = torch.float64 if self.dtype == np.float64 else torch.float32
    info, g = setting.info, setting.config.generator
    self.width = g.width
    self.teacher_vars = _cast(setting.teacher["variables"], self.dtype)
    self.state0 = _cast(setting.state0, self.dtype)
    self.t_teacher = authors_resnet34(info.num_classes).to(self.torch_dtype)
    load_into_torch(self.t_teacher, self.teacher_vars["params"], self.teacher_vars["batch_stats"])
    for p in self.t_teacher.parameters():
      p.requires_grad_(False)   # frozen: the authors' loop never steps it either
    t_gen = AuthorsGenerator(info.image_size, g.latent_dim, info.channels).to(self.torch_dtype)
    load_into_torch(t_gen, self.state0["gen"]["params"], self.state0["gen"]["batch_stats"],
                    generator=True, gen_width=self.width)
    t_student = authors_resnet18(info.num_classes).to(self.torch_dtype)
    load_into_torch(t_student, self.state0["student"]["params"],
                    self.state0["student"]["batch_stats"])
    self.authors = AuthorsDAFL(setting.config, self.t_teacher, t_gen, t_student)
    self.bn_count = _bn_sample_counts(t_gen, t_student)
    self.state = self.state0

  def precision(self):
    return jax.enable_x64(self.dtype == np.float64)

  def latents(self, step: int):
    """The JAX step's latents of step `step` (0-based), as drawn inside the step."""
    key = common.step_key(self.setting.config.seed, dafl.STAGE_SALT, step)
    cfg = self.setting.config
    return np.array(jax.random.normal(key, (cfg.student.batch_size, cfg.generator.latent_dim)))

  def jax_pieces(self, z):
    s0 = self.state0
    return jax.device_get(self.setting.pieces_fn(
        self.teacher_vars, s0["gen"]["params"], s0["gen"]["batch_stats"],
        s0["student"]["params"], s0["student"]["batch_stats"], z))

  def jax_step(self, state):
    """The stage's jitted step on this precision's teacher variables."""
    return self.setting.step(state, None, teacher_vars=self.teacher_vars)

  def generate(self, params, batch_stats, z):
    return np.asarray(self.setting.generate_fn(params, batch_stats, z))

  def torch_z(self, z):
    return torch.from_numpy(np.array(z)).to(self.torch_dtype)

  def copy_of_authors(self, dtype):
    """The authors' loop on copies of this variant's PyTorch modules, cast to `dtype`."""
    cp = lambda m: copy.deepcopy(m).to(dtype)
    a = self.authors
    return AuthorsDAFL(self.setting.config, cp(a.teacher), cp(a.generator), cp(a.net))


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
  """Per-leaf rows of two Flax-layout pytrees (each leaf, or the worst one as a summary)."""
  a, b = flat(ours), flat(theirs)
  rows = [_row(f"{label} {'/'.join(p)}", a[p], b[p], tol) for p in sorted(b)
          if "/".join(p) not in skip]
  if per_leaf or len(rows) <= 1:
    return rows
  worst = max(rows, key=lambda r: r["rel"])
  worst = dict(worst, quantity=f"{label}: worst of {len(rows)} leaves ("
               f"{worst['quantity'][len(label) + 1:]})")
  worst["abs"] = max(r["abs"] for r in rows)
  worst["ok"] = all(r["ok"] for r in rows) if tol is not None else None
  return [worst]


def _torch_grads(authors, like_g, like_s, width):
  return (torch_tree(authors.generator, like_g, generator=True, gen_width=width, grads=True),
          torch_tree(authors.net, like_s, grads=True))


def _bn_cancelled_rows(label, ours, theirs):
  """The BN-cancelled biases' gradients: both sides' norm over the whole gradient's norm."""
  scale = max(math.sqrt(sum(float(np.sum(np.square(x))) for x in flat(theirs).values())),
              1e-30)
  rows = []
  for name in BN_CANCELLED:
    path = tuple(name.split("/"))
    a, b = flat(ours)[path], flat(theirs)[path]
    r = _row(f"{label} {name} (BN-cancelled: ||g|| / ||grad G||, larger side)", a, b)
    r.update(rel=max(np.linalg.norm(a), np.linalg.norm(b)) / scale, tol=GRAD_TOL)
    r["ok"] = r["rel"] <= GRAD_TOL
    rows.append(r)
  return rows


def one_step(v: Variant):
  """JAX pieces and the authors' forward/backward of step 1 (nothing updated): (jax dict,
  torch (images, logits, features, terms), torch grads (G, S))."""
  z = v.latents(0)
  j = v.jax_pieces(z)
  a = v.authors
  # The forward pass updates PyTorch's running statistics: put them back afterwards, so that
  # the steps start from the same state as the JAX step.
  saved = [(m, copy.deepcopy(m.state_dict())) for m in (a.generator, a.net)]
  out_t = a.forward_backward(v.torch_z(z))
  grads_t = _torch_grads(a, v.state0["gen"]["params"], v.state0["student"]["params"], v.width)
  a.optimizer_g.zero_grad()
  a.optimizer_s.zero_grad()
  for m, sd in saved:
    m.load_state_dict(sd)
  return j, out_t, grads_t


def _global_row(quantity, ours, theirs, tol, skip=()):
  """One row over all leaves of two pytrees, as one concatenated vector."""
  a, b = flat(ours), flat(theirs)
  keys = [p for p in sorted(b) if "/".join(p) not in skip]
  return _row(quantity, np.concatenate([np.ravel(a[p]) for p in keys]),
              np.concatenate([np.ravel(b[p]) for p in keys]), tol)


def one_step_rows(v: Variant, per_leaf=False, prefix=""):
  """Rows comparing the first step's images, losses and gradients of both implementations.

  Gradients: per leaf at GRAD_TOL in float64; in float32, all leaves together at the sanity
  bound FLOAT32_GRAD_TOL and the worst leaf for information.
  """
  float32 = v.dtype == np.float32
  with v.precision():
    j, (images_t, logits_t, feats_t, terms_t), (g_t, s_t) = one_step(v)
  rows = [
      _row(f"{prefix}generated images", j["images"], _nchw_to_nhwc(images_t), GRAD_TOL),
      _row(f"{prefix}teacher logits", j["logits"], logits_t.numpy(), GRAD_TOL),
      _row(f"{prefix}teacher features (512-d)", j["features"], feats_t.numpy(), GRAD_TOL),
  ]
  for k in ("l_oh", "l_a", "l_ie", "loss_g", "loss_kd"):
    rows.append(_row(f"{prefix}loss {k}", j["terms"][k], terms_t[k], LOSS_TOL, kind="loss"))
  for name, ours, theirs in (("G", j["g_grads"], g_t), ("S", j["s_grads"], s_t)):
    skip = BN_CANCELLED if name == "G" else ()
    if float32:
      rows.append(_global_row(f"{prefix}grad {name}, all leaves", ours, theirs,
                              FLOAT32_GRAD_TOL, skip))
    rows += _leaf_rows(f"{prefix}grad {name}", ours, theirs, None if float32 else GRAD_TOL,
                       per_leaf, skip=skip)
    if name == "G":
      rows += _bn_cancelled_rows(f"{prefix}grad G", ours, theirs)
  return rows, j, (g_t, s_t)


def float32_floor_rows(v: Variant, j, grads_t, prefix=""):
  """The float32 gradients of both implementations against the authors' code in float64
  (same weights, the float32 latents): how far float32 is from exact, on either side."""
  ref = v.copy_of_authors(torch.float64)
  with v.precision():
    z = v.latents(0)
  ref.forward_backward(torch.from_numpy(z).double())
  g64, s64 = _torch_grads(ref, v.state0["gen"]["params"], v.state0["student"]["params"],
                          v.width)
  rows = []
  for name, ours, t32, t64 in (("G", j["g_grads"], grads_t[0], g64),
                               ("S", j["s_grads"], grads_t[1], s64)):
    for who, x in (("JAX float32", ours), ("PyTorch float32 (same code)", t32)):
      label = f"{prefix}grad {name}, {who} vs PyTorch float64"
      rows.append(_global_row(f"{label}, all leaves", x, t64, None, BN_CANCELLED))
      rows += _leaf_rows(label, x, t64, None, False, skip=BN_CANCELLED)
  return rows


def _biased_running_var(v: Variant, module, like, prev_t, prev_fix, generator):
  """PyTorch's running variances with each update's unbiased batch variance turned biased:
  v_fix = (1-m) v_fix_prev + (v_torch - (1-m) v_torch_prev) * (n-1)/n, n values per channel."""
  bns = dict(module.named_modules())
  out = {}
  for path, x in flat(torch_tree(module, like, generator=generator)).items():
    if path[-1] != "var":
      out[path] = x
      continue
    mod = bns[torch_name(path, generator).rsplit(".", 1)[0]]
    n, m = v.bn_count[mod], mod.momentum
    out[path] = (1 - m) * prev_fix[path] + (x - (1 - m) * prev_t[path]) * (n - 1) / n
  return out


def steps_rows(v: Variant, steps: int, per_leaf=False, checked=True, prefix=""):
  """Rows comparing `steps` joint steps of the JAX stage's jitted step and the authors' loop.

  checked=False: only step 1's losses have a tolerance (float32, where the steps diverge).
  """
  a, s0, width = v.authors, v.state0, v.width
  param_tol = PARAM_TOL if checked else None
  gen_bs_like, st_bs_like = s0["gen"]["batch_stats"], s0["student"]["batch_stats"]
  prev_t = {"G": flat(gen_bs_like), "S": flat(st_bs_like)}
  fixed = {"G": dict(prev_t["G"]), "S": dict(prev_t["S"])}
  rows = []
  with v.precision():
    state = v.state
    for i in range(steps):
      state, metrics = v.jax_step(state)
      metrics = jax.device_get(metrics)
      _, _, _, terms_t = a.forward_backward(v.torch_z(v.latents(i)))
      norms = [math.sqrt(sum(float(torch.sum(p.grad.double()**2)) for p in m.parameters()))
               for m in (a.generator, a.net)]
      a.optimizer_steps()
      for k in ("l_oh", "l_a", "l_ie", "loss_g", "loss_kd"):
        rows.append(_row(f"{prefix}step {i + 1} (jitted step) loss {k}", metrics[k],
                         terms_t[k], LOSS_TOL if checked or i == 0 else None, kind="loss"))
      tol = GRAD_TOL if checked else FLOAT32_GRAD_TOL if i == 0 else None
      for name, norm in zip(("g", "s"), norms):
        rows.append(_row(f"{prefix}step {i + 1} (jitted step) grad_norm_{name}",
                         metrics[f"grad_norm_{name}"], norm, tol))
      for key, mod, like, gen in (("G", a.generator, gen_bs_like, True),
                                  ("S", a.net, st_bs_like, False)):
        cur = flat(torch_tree(mod, like, generator=gen))
        fixed[key] = _biased_running_var(v, mod, like, prev_t[key], fixed[key], gen)
        prev_t[key] = cur
    state = jax.device_get(state)
    v.state = state
    after = f"{prefix}after {steps} steps:"
    gen_t = torch_tree(a.generator, s0["gen"]["params"], generator=True, gen_width=width)
    rows += _leaf_rows(f"{after} G param", state["gen"]["params"], gen_t, param_tol, per_leaf,
                       skip=BN_CANCELLED)
    for name in BN_CANCELLED:   # Adam scales their noise gradients: no effect on the output.
      path = tuple(name.split("/"))
      rows.append(_row(f"{after} G param {name} (BN-cancelled, no effect on G)",
                       flat(state["gen"]["params"])[path], flat(gen_t)[path]))
    st_t = torch_tree(a.net, s0["student"]["params"])
    rows += _leaf_rows(f"{after} S param", state["student"]["params"], st_t, param_tol, per_leaf)
    if checked:
      for key, ours, like, mod, gen in (
          ("G", state["gen"]["batch_stats"], gen_bs_like, a.generator, True),
          ("S", state["student"]["batch_stats"], st_bs_like, a.net, False)):
        raw = flat(torch_tree(mod, like, generator=gen))
        mine = flat(ours)
        means = _unflat({p: x for p, x in mine.items() if p[-1] == "mean"})
        varis = _unflat({p: x for p, x in mine.items() if p[-1] == "var"})
        rows += _leaf_rows(f"{after} {key} BN running mean", means,
                           _unflat({p: raw[p] for p in flat(means)}), param_tol, False)
        rows += _leaf_rows(f"{after} {key} BN running var as stored (PyTorch: unbiased)",
                           varis, _unflat({p: raw[p] for p in flat(varis)}), None, False)
        rows += _leaf_rows(f"{after} {key} BN running var, PyTorch's made biased", varis,
                           _unflat({p: fixed[key][p] for p in flat(varis)}), param_tol, False)
    # The function: both generators after the steps, on new latents.
    cfg = v.setting.config
    z = np.array(jax.random.normal(jax.random.key(777), (cfg.student.batch_size,
                                                         cfg.generator.latent_dim)), v.dtype)
    imgs_j = v.generate(state["gen"]["params"], state["gen"]["batch_stats"], z)
  with torch.no_grad():
    imgs_t = a.generator(v.torch_z(z))
  rows.append(_row(f"{after} G images on new latents", imgs_j, _nchw_to_nhwc(imgs_t),
                   param_tol))
  return rows, z, imgs_t


def float32_steps_floor_rows(v: Variant, steps: int, z, imgs_t32, prefix=""):
  """The authors' loop in float32 against itself in float64 after `steps` steps (same
  weights and latents): the float32 divergence of the code itself."""
  with v.precision():
    zs = [v.latents(i) for i in range(steps)]
  # v's modules hold the weights after the steps: start again from the initial ones.
  fresh = Variant(v.setting, np.float32)
  ref = fresh.copy_of_authors(torch.float64)
  for zi in zs:
    ref.forward_backward(torch.from_numpy(zi).double())
    ref.optimizer_steps()
  with torch.no_grad():
    imgs64 = ref.generator(torch.from_numpy(np.array(z)).double())
  return [_row(f"{prefix}after {steps} steps: G images on new latents, PyTorch float32 vs "
               "PyTorch float64 (same code)", _nchw_to_nhwc(imgs_t32), _nchw_to_nhwc(imgs64))]


# Float64: after the steps, parameters, statistics and images agree to rounding.
PARAM_TOL = 1e-6
# Float32 gradients, all leaves together: a sanity bound above the ReLU-kink floor (~1e-3 at
# batch 8, growing with the batch; see the module docstring). It catches a missing term, a sign
# or a scale, not every wrong weight (swapping w_oh and w_a moves grad G by ~1.5e-2): the
# float64 rows and the float32 losses do that.
FLOAT32_GRAD_TOL = 5e-2


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


NOTES = """\
Differences between the authors' code and this project, and what the table shows of them:
- Upsampling: the authors upsample (F.interpolate, nearest x2), then convolve; the Flax
  generator computes nearest x2 + Conv3x3 as one low-resolution convolution with a phase-summed
  kernel and a depth-to-space reshape (models/generators.py UpsampleConv). Same function and
  parameters; sums in another order (rounding only).
- Generator Dense output order: Flax reshapes to (h, w, c), the authors view as (c, h, w); the
  weights are permuted when copied (no effect on the function).
- BatchNorm running variance: PyTorch updates it with the unbiased batch variance (x n/(n-1)),
  Flax's nn.BatchNorm with the biased one: rows 'as stored'; they agree once PyTorch's update is
  made biased. Training-mode outputs and gradients are unaffected. Only the student's statistics
  are used (at evaluation); at batch 1024 the factor is at most 1 + 1/16383 (ResNet-18's 4x4
  last stage).
- Flax's BatchNorm computes the batch variance as E[x^2] - E[x]^2; PyTorch in two passes
  (rounding only).
- Generator conv1/conv2 biases sit right before a training-mode BatchNorm, which removes them:
  their exact gradient is 0 and both sides return rounding noise, which Adam scales to steps of
  up to lr and arbitrary sign ('BN-cancelled' rows); no effect on the generator's output.
- Float32 gradients are ReLU-kink limited (module docstring): compare the 'JAX float32 vs
  PyTorch float64' and 'PyTorch float32 vs PyTorch float64' rows; the steps after the first
  diverge in float32 on both sides alike.
- The authors wrap teacher, generator and student in nn.DataParallel: on several GPUs each
  replica's BatchNorm normalises its own slice of the batch; the JAX step (and the authors' code
  on one GPU) normalises over the whole batch. Not compared here.
- The authors' loop keeps the student with the best test accuracy (test-set selection); this
  project reports the final student. Not compared here."""


def run(batch=8, steps=3, schedule_steps=5, seed=0, per_leaf=False, divergence=False):
  """All rows of the check: float64 (one step, `steps` steps), then float32 (divergence: also
  the authors' code in float32 against itself in float64 after the steps)."""
  setting = Setting(batch, schedule_steps, seed)
  v64 = Variant(setting, np.float64)
  rows, _, _ = one_step_rows(v64, per_leaf, prefix="f64 ")
  if steps:
    rows += steps_rows(v64, steps, per_leaf, prefix="f64 ")[0]
  v32 = Variant(setting, np.float32)
  r32, j32, grads32 = one_step_rows(v32, per_leaf, prefix="f32 ")
  rows += r32 + float32_floor_rows(v32, j32, grads32, prefix="f32 ")
  if steps:
    r, z, imgs_t32 = steps_rows(v32, steps, per_leaf, checked=False, prefix="f32 ")
    rows += r
    if divergence:
      rows += float32_steps_floor_rows(v32, steps, z, imgs_t32, prefix="f32 ")
  return setting, rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=3, help="joint steps compared (0: one step only)")
  p.add_argument("--schedule_steps", type=int, default=5,
                 help="the student's total steps (its step schedule's boundaries are 40%% and "
                      "80%% of them)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--per_leaf", action="store_true", help="a row for every leaf")
  p.add_argument("--divergence", action="store_true",
                 help="also run the authors' loop in float64 from the float32 latents and "
                      "compare its generator after the steps with the float32 one's")
  p.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: its default)")
  args = p.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  setting, rows = run(args.batch, args.steps, args.schedule_steps, args.seed, args.per_leaf,
                      args.divergence)
  c = setting.config
  lrs = [c.student.lr * (1.0 if i < 0.4 * c.student.steps else
                         0.1 if i < 0.8 * c.student.steps else 0.01) for i in range(args.steps)]
  print(f"CIFAR-10 DAFL (configs/cifar10.py, method dafl), batch {args.batch}, seed {args.seed}: "
        f"teacher {c.teacher.model} (random, eval mode), student {c.student.model}, latent "
        f"{c.generator.latent_dim}, generator width {c.generator.width}; student lr per step "
        f"{lrs}; jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}"
        "\n")
  print(format_table(rows))
  print()
  print(NOTES)
  failed = [r["quantity"] for r in rows if r["ok"] is False]
  print(f"\n{len(rows) - len(failed)} of {len(rows)} rows pass or are information only"
        + (f"; FAILED: {failed}" if failed else ""))
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
