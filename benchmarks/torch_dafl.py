"""The authors' DAFL in PyTorch: the one transcription every benchmark compares with.

The source is the authors' release (huawei-noah/Efficient-Computing,
Data-Efficient-Model-Compression/DAFL): DAFL-train.py's Generator, kdloss, generator losses and
training loop (its MNIST and CIFAR branches), lenet.py's LeNet5 / LeNet5Half and resnet.py's
CIFAR ResNets (BasicBlock). Used by the MNIST parity benchmark (dafl_torch_reference), the
CIFAR-10 cross-check (dafl_cifar_torch_check, tests/test_dafl_cifar_torch.py), step_speed's
DAFL rows and, for its teachers and the weight conversion, the ensemble reference
(torch_ensemble). It needs PyTorch (`pip install torch==2.13.0`: the benchmarks' reference only,
not a dependency of the package).

Where the authors fix a value on the command line or in the code, it is a parameter here, with
the authors' value as its default or taken from this project's config:
- Generator: the image size, latent size and channels (opt.img_size, opt.latent_dim,
  opt.channels) and the width (the authors' 128; the second block has width // 2), so that the
  mnist5k config's width-16 generator can be compared too.
- LeNet5: the widths (lenet.py's LeNet5 (6, 16, 120, 84), LeNet5Half (3, 8, 60, 42)), the input
  channels and `bn`: this project's LeNet-5-BN (a BatchNorm after each convolution, before its
  ReLU), which the authors do not have (the ensemble reference's teacher).
- AuthorsDAFL, the loop: the loss weights (opt.oh, opt.ie, opt.a), learning rates and the
  student's optimiser come from the config (generator.w_oh / w_ie / w_a, lr; student.optimizer):
  the MNIST branch's Adam or the CIFAR branch's SGD (momentum 0.9, weight decay 5e-4: the
  config's student.momentum and weight_decay, which default to them). The student's learning
  rate is set before every step from the config's schedule: 'step' is the CIFAR branch's
  adjust_learning_rate (lr below 800 of 2000 epochs, 0.1 lr below 1600, then 0.01 lr) with one
  step per epoch and the config's two boundaries as the fractions (0.4, 0.8); 'constant' is the
  MNIST branch (no schedule); 'cosine' is the project's mnist5k schedule, which the authors do
  not have (lr * 0.5 (1 + cos(pi step / steps)), as optax's cosine decay to 0). Adam's betas
  are the config's (generator.b1 / b2; PyTorch's defaults (0.9, 0.999), the authors', are the
  config's defaults too).
Not transcribed: nn.DataParallel (on several GPUs each replica's BatchNorm normalises its own
slice of the batch; here one device normalises the whole batch) and the authors' keeping of the
student with the best test accuracy (the benchmarks report the final student).

Weights: `load_flax` copies a Flax model's params and batch_stats into these modules and
`torch_tree` reads them (or their gradients) back in Flax's layout, by name, one to one (every
tensor of the module has a Flax source and every Flax leaf a target). Conv kernels HWIO <->
OIHW, Dense kernels transposed, and the generator's Dense output reordered from Flax's
(h, w, c) to PyTorch's (c, h, w) (modules with a `dense_channels` attribute: their 'fc').
"""
from __future__ import annotations

import math

import jax
import numpy as np
import torch
import torch.nn.functional as F

nn = torch.nn

LENET5 = (6, 16, 120, 84)
LENET5_HALF = (3, 8, 60, 42)
# Per-channel generator conv biases directly before a training-mode BatchNorm: the BatchNorm
# removes them, so their exact gradient is 0 and both implementations return rounding noise.
BN_CANCELLED = ("conv1/bias", "conv2/bias")


# ---------------------------------------------------------------------------------------------
# The authors' modules.
# ---------------------------------------------------------------------------------------------

class Generator(nn.Module):
  """DAFL-train.py's Generator; opt.img_size, opt.latent_dim, opt.channels and its width 128 as
  arguments."""

  def __init__(self, img_size=32, latent_dim=100, channels=1, width=128):
    super().__init__()
    self.init_size = img_size // 4
    self.width = self.dense_channels = width
    self.l1 = nn.Sequential(nn.Linear(latent_dim, width * self.init_size**2))
    self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(width))
    self.conv_blocks1 = nn.Sequential(
        nn.Conv2d(width, width, 3, stride=1, padding=1),
        nn.BatchNorm2d(width, 0.8),
        nn.LeakyReLU(0.2, inplace=True),
    )
    self.conv_blocks2 = nn.Sequential(
        nn.Conv2d(width, width // 2, 3, stride=1, padding=1),
        nn.BatchNorm2d(width // 2, 0.8),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(width // 2, channels, 3, stride=1, padding=1),
        nn.Tanh(),
        nn.BatchNorm2d(channels, affine=False),
    )

  def forward(self, z):
    out = self.l1(z)
    out = out.view(out.shape[0], self.width, self.init_size, self.init_size)
    img = self.conv_blocks0(out)
    img = nn.functional.interpolate(img, scale_factor=2)
    img = self.conv_blocks1(img)
    img = nn.functional.interpolate(img, scale_factor=2)
    img = self.conv_blocks2(img)
    return img


class LeNet5(nn.Module):
  """lenet.py's LeNet5 (widths LENET5) and LeNet5Half (LENET5_HALF): conv5-relu-pool,
  conv5-relu-pool, conv5-relu (the features), fc-relu, fc. bn: this project's LeNet-5-BN, a
  BatchNorm after each convolution. Attributes carry the Flax names."""

  def __init__(self, num_classes=10, widths=LENET5, channels=1, bn=False):
    super().__init__()
    c1, c2, c3, f4 = widths
    self.bn = bn
    self.conv1 = nn.Conv2d(channels, c1, kernel_size=(5, 5))
    self.conv2 = nn.Conv2d(c1, c2, kernel_size=(5, 5))
    self.conv3 = nn.Conv2d(c2, c3, kernel_size=(5, 5))
    self.fc1 = nn.Linear(c3, f4)
    self.fc2 = nn.Linear(f4, num_classes)
    if bn:
      self.bn1, self.bn2, self.bn3 = (nn.BatchNorm2d(c) for c in (c1, c2, c3))

  def _conv(self, i, x):
    x = getattr(self, f"conv{i}")(x)
    return F.relu(getattr(self, f"bn{i}")(x) if self.bn else x)

  def forward(self, img, out_feature=False):
    output = F.max_pool2d(self._conv(1, img), kernel_size=(2, 2), stride=2)
    output = F.max_pool2d(self._conv(2, output), kernel_size=(2, 2), stride=2)
    feature = self._conv(3, output).flatten(1)
    output = self.fc2(F.relu(self.fc1(feature)))
    return (output, feature) if out_feature else output


class BasicBlock(nn.Module):
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


class ResNet(nn.Module):
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


# The classifiers by this project's model names: (num_classes, channels) -> module.
CLASSIFIERS = {
    "lenet5": lambda k, c: LeNet5(k, LENET5, c),
    "lenet5_half": lambda k, c: LeNet5(k, LENET5_HALF, c),
    "lenet5_bn": lambda k, c: LeNet5(k, LENET5, c, bn=True),
    "lenet5_half_bn": lambda k, c: LeNet5(k, LENET5_HALF, c, bn=True),
    "resnet18": lambda k, c: ResNet(BasicBlock, [2, 2, 2, 2], k),
    "resnet34": lambda k, c: ResNet(BasicBlock, [3, 4, 6, 3], k),
}


def classifier(name: str, num_classes: int, channels: int):
  """The PyTorch classifier of this project's model `name` (one of CLASSIFIERS)."""
  return CLASSIFIERS[name](num_classes, channels)


def classifier_unsupported(name: str, width: int = 0) -> str:
  """Why the model `name` (ResNet base width `width`, 0 = 64) has no transcription, or ''."""
  if name not in CLASSIFIERS:
    return f"the PyTorch models are {', '.join(CLASSIFIERS)} (asked: {name})"
  if name.startswith("resnet") and width not in (0, 64):
    return f"the authors' ResNets have width 64 (asked: {width})"
  return ""


# ---------------------------------------------------------------------------------------------
# The authors' losses and loop.
# ---------------------------------------------------------------------------------------------

def kdloss(y, teacher_scores):
  """DAFL-train.py's kdloss; `size_average=False` (deprecated) is `reduction='sum'`."""
  p = F.log_softmax(y, dim=1)
  q = F.softmax(teacher_scores, dim=1)
  return F.kl_div(p, q, reduction="sum") / y.shape[0]


def generator_losses(outputs_t, features_t):
  """DAFL-train.py's generator loss terms of the teacher's outputs and features:
  (loss_one_hot, loss_information_entropy, loss_activation)."""
  pred = outputs_t.data.max(1)[1]
  loss_activation = -features_t.abs().mean()
  loss_one_hot = F.cross_entropy(outputs_t, pred)
  softmax_o_t = torch.nn.functional.softmax(outputs_t, dim=1).mean(dim=0)
  loss_information_entropy = (softmax_o_t * torch.log10(softmax_o_t)).sum()
  return loss_one_hot, loss_information_entropy, loss_activation


def student_lr(scfg, step: int) -> float:
  """The student's learning rate at `step` (0-based) under the config's schedule (see the
  module docstring)."""
  total = scfg.steps
  if scfg.schedule == "step":   # adjust_learning_rate, one iteration per epoch
    low, high = scfg.boundaries
    if step < low * total:
      return scfg.lr
    return 0.1 * scfg.lr if step < high * total else 0.01 * scfg.lr
  if scfg.schedule == "cosine":
    return scfg.lr * (0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
  return scfg.lr


def unsupported(config) -> str:
  """Why `config`'s DAFL has no transcription here, or '' when it has one."""
  g, s = config.generator, config.student
  for role in ("teacher", "student"):
    why = classifier_unsupported(config[role].model, config[role].width)
    if why:
      return f"{role}: {why}"
  if (g.style, g.num_upsample) != ("dafl", 2):
    return "the authors' generator is style 'dafl' with two upsamplings"
  if g.optimizer != "adam" or s.optimizer not in ("adam", "sgd"):
    return "the authors' loop has an Adam generator and an Adam or SGD student"
  if s.temperature != 1.0 or config.get("dtype", "float32") != "float32":
    return "the authors' loop distils at temperature 1, in float32"
  if s.schedule == "step" and len(s.boundaries) != 2:
    return "the authors' step schedule has two boundaries"
  return ""


class AuthorsDAFL:
  """DAFL-train.py's training loop around given modules (see the module docstring).

  forward_backward(z) is the loop body up to loss.backward() (the student's learning rate set
  first); optimizer_steps() the two optimiser steps; step(z) both.
  """

  def __init__(self, config, teacher, generator, student):
    g, s = config.generator, config.student
    self.config = config
    self.teacher, self.generator, self.net = teacher, generator, student
    self.teacher.eval()
    self.criterion = torch.nn.CrossEntropyLoss()
    self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=g.lr, betas=(g.b1, g.b2),
                                        weight_decay=g.weight_decay)
    if s.optimizer == "sgd":
      self.optimizer_s = torch.optim.SGD(self.net.parameters(), lr=s.lr, momentum=s.momentum,
                                         weight_decay=s.weight_decay)
    else:
      self.optimizer_s = torch.optim.Adam(self.net.parameters(), lr=s.lr,
                                          weight_decay=s.weight_decay)
    self.iteration = 0

  def forward_backward(self, z):
    """The loop body up to loss.backward(): (gen_imgs, outputs_T, features_T, losses), the
    tensors detached; losses: l_oh, l_a, l_ie, loss_g (the generator's weighted sum), loss_kd."""
    c = self.config.generator
    for param_group in self.optimizer_s.param_groups:
      param_group["lr"] = student_lr(self.config.student, self.iteration)
    self.net.train()
    self.optimizer_g.zero_grad()
    self.optimizer_s.zero_grad()
    gen_imgs = self.generator(z)
    outputs_t, features_t = self.teacher(gen_imgs, out_feature=True)
    loss_one_hot, loss_information_entropy, loss_activation = generator_losses(outputs_t,
                                                                               features_t)
    loss = loss_one_hot * c.w_oh + loss_information_entropy * c.w_ie + loss_activation * c.w_a
    loss_g = loss.item()
    loss_kd = kdloss(self.net(gen_imgs.detach()), outputs_t.detach())
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

  def step(self, z):
    """One whole iteration on latents z: its loss terms."""
    terms = self.forward_backward(z)[3]
    self.optimizer_steps()
    return terms


def freeze(module):
  """`module` in evaluation mode without gradients (a teacher: never stepped)."""
  module.eval()
  for p in module.parameters():
    p.requires_grad_(False)
  return module


def teacher_module(name: str, info, variables, dtype=torch.float32, device="cpu"):
  """The frozen PyTorch teacher of model `name` with the Flax `variables` copied in."""
  model = classifier(name, info.num_classes, info.channels).to(device=device, dtype=dtype)
  load_flax(model, variables["params"], variables.get("batch_stats", {}))
  return freeze(model)


def build(config, info, teacher, state=None, dtype=torch.float32, device="cpu") -> AuthorsDAFL:
  """AuthorsDAFL of `config` around the PyTorch `teacher`: the generator, then the student,
  built with PyTorch's default initialisation in that order (so that the random stream after
  it depends on the seed set before only), cast to `dtype` on `device`; given the DAFL stage's
  `state`, state['gen'] and state['student'] (params and batch_stats) are copied into them."""
  g = config.generator
  gen = Generator(info.image_size, g.latent_dim, info.channels, g.width)
  student = classifier(config.student.model, info.num_classes, info.channels)
  for module, key in ((gen, "gen"), (student, "student")):
    module.to(device=device, dtype=dtype)
    if state is not None:
      load_flax(module, state[key]["params"], state[key]["batch_stats"])
  return AuthorsDAFL(config, teacher, gen, student)


def accuracy(model, images_nchw, labels) -> float:
  """Test accuracy of `model` in evaluation mode (the authors' test loop: net.eval())."""
  model.eval()
  with torch.no_grad():
    return (model(images_nchw).argmax(1) == labels).float().mean().item()


# ---------------------------------------------------------------------------------------------
# Flax <-> PyTorch weights, by name.
# ---------------------------------------------------------------------------------------------

_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var"}
_GEN_MODULES = {"fc": "l1.0", "bn0": "conv_blocks0.0", "conv1": "conv_blocks1.0",
                "bn1": "conv_blocks1.1", "conv2": "conv_blocks2.0", "bn2": "conv_blocks2.1",
                "conv_out": "conv_blocks2.3", "bn_out": "conv_blocks2.5"}
_RESNET_OUTER = {"stem_conv": "conv1", "stem_bn": "bn1", "head": "linear"}
_RESNET_INNER = {"conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2",
                 "shortcut_conv": "shortcut.0", "shortcut_bn": "shortcut.1"}


def torch_name(module, path) -> str:
  """The name in `module`'s state_dict of the Flax leaf at `path` (a tuple of names): the
  Generator's and ResNet's own names; any other module carries the Flax names."""
  *mods, leaf = path
  leaf = _LEAF[leaf]
  if isinstance(module, Generator):
    (mod,) = mods
    return f"{_GEN_MODULES[mod]}.{leaf}"
  if isinstance(module, ResNet):
    if mods[0].startswith("stage"):
      stage, block = mods[0].split("_block")
      return f"layer{int(stage[5:])}.{int(block) - 1}.{_RESNET_INNER[mods[1]]}.{leaf}"
    (mod,) = mods
    return f"{_RESNET_OUTER[mod]}.{leaf}"
  return ".".join(list(mods) + [leaf])


def torch_module_name(module, layer_path) -> str:
  """The name of the submodule of `module` that holds the Flax BatchNorm at `layer_path`."""
  return torch_name(module, tuple(layer_path) + ("mean",)).rsplit(".", 1)[0]


def flat(tree):
  """{('a', 'b', 'leaf'): numpy array} of a nested dict (Flax params / batch_stats)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[tuple(k.key for k in path)] = np.asarray(leaf)
  return out


def unflat(flat_tree):
  """The nested dict of flat()'s {path: leaf}."""
  out = {}
  for path, leaf in flat_tree.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return out


def _dense_channels(module, path) -> int:
  return getattr(module, "dense_channels", 0) if path[0] == "fc" else 0


def _dense_perm(x, channels, to_torch: bool):
  """Reorders a Dense output axis (the last): Flax (h, w, c) <-> PyTorch (c, h, w)."""
  lead = x.shape[:-1]
  s = int(round(math.sqrt(x.shape[-1] // channels)))
  if to_torch:
    x = np.moveaxis(x.reshape(lead + (s, s, channels)), -1, len(lead))
  else:
    x = np.moveaxis(x.reshape(lead + (channels, s, s)), len(lead), -1)
  return x.reshape(lead + (-1,))


def to_torch_layout(path, x, dense_channels=0):
  """A Flax leaf in the layout of the corresponding PyTorch tensor."""
  x = np.array(x)
  if dense_channels:
    x = _dense_perm(x, dense_channels, to_torch=True)
  if path[-1] == "kernel":
    x = np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else x.T
  return np.array(x, order="C")  # a writable copy, as torch.from_numpy wants


def to_flax_layout(path, t, dense_channels=0):
  """A PyTorch tensor (weight, gradient, buffer) in the corresponding Flax leaf's layout."""
  x = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
  if path[-1] == "kernel":
    x = np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else x.T
  if dense_channels:
    x = _dense_perm(x, dense_channels, to_torch=False)
  return np.array(x, order="C")  # a copy: .numpy() shares memory with buffers updated in place


def load_flax(module, params, batch_stats=None):
  """Copies Flax params and batch_stats into `module`. Every Flax leaf must have a target, and
  every parameter and running statistic of `module` a source, except the names in its
  `without_flax_source` attribute."""
  targets = dict(module.named_parameters())
  targets.update({k: v for k, v in module.named_buffers() if not k.endswith("num_batches_tracked")})
  done = set()
  with torch.no_grad():
    for tree in (params, batch_stats or {}):
      for path, x in flat(tree).items():
        name = torch_name(module, path)
        t = targets[name]
        src = torch.from_numpy(to_torch_layout(path, x, _dense_channels(module, path)))
        if tuple(src.shape) != tuple(t.shape):
          raise ValueError(f"{'/'.join(path)} -> {name}: shape {tuple(src.shape)} vs "
                           f"{tuple(t.shape)}")
        t.copy_(src)
        done.add(name)
  missing = sorted(set(targets) - done - set(getattr(module, "without_flax_source", ())))
  if missing:
    raise ValueError(f"PyTorch tensors without a Flax source: {missing}")


def torch_tree(module, like, grads=False):
  """The Flax-layout pytree of `like`'s structure read from `module` (its .grad with grads)."""
  tensors = dict(module.named_parameters())
  tensors.update(dict(module.named_buffers()))
  out = {}
  for path in flat(like):
    t = tensors[torch_name(module, path)]
    out[path] = to_flax_layout(path, t.grad if grads else t, _dense_channels(module, path))
  return unflat(out)
