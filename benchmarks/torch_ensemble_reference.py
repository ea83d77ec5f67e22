"""A PyTorch reference of one generator-ensemble step (stages/ensemble.py, Luo et al. 2020).

Imported by benchmarks/step_speed.py (rows ensembleN and cifar_ensembleN); it needs PyTorch
(`pip install torch==2.13.0`: the reference only, not a dependency of the package).

What one member update of the project computes (`ensemble.member_update` with loss 'luo'), in
PyTorch's usual form:
  z ~ randn(batch, latent); x = G_k(z) (generator in training mode);
  logits = T(x) (teacher in evaluation mode; forward pre-hooks on its BatchNorm2d layers record
  the batch mean and biased variance of each BN layer's input, per channel);
  loss = CE(logits, class k) + w_tv * TV(x) + w_l2 * l2(x)
         + w_mm * sum over BN layers l of ||mu_l - mu_t,l||_2 + ||var_l - var_t,l||_2
  (losses.inceptionism_loss + losses.bn_moment_matching, form 'l2'; TV and l2 size-normalised
  as in losses.py); backward; one Adam step of G_k (config.ensemble's lr and betas).
The ensemble step is the loop over the N members. Not computed here (the project's step
returns them as metrics): the gradient norm and the teacher's agreement with the target class.

LuoGenerator is models/generators.py's style 'luo' the way the authors' code computes it
(nearest x2 upsampling, then the 3x3 convolution; the project folds the two into one
low-resolution convolution, the same function): Dense -> BN(eps 1e-5) -> LeakyReLU(0.2), then
per block nearest x2 -> Conv3x3 -> BN(eps 0.8, momentum 0.1) -> LeakyReLU(0.2), then
Conv3x3(C) -> tanh -> BN(eps 0.8, scale only: BatchNorm2d(affine=True) whose bias is frozen at
0). Its modules carry the Flax names (fc, bn0, conv1, bn1, ..., conv_out, bn_out), so
`load_flax` copies a Flax member's parameters by name. LeNet5BN is classifiers.LeNet5 with
use_bn (conv-BN-relu-pool x2, conv-BN-relu, fc-relu-fc), Flax names too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dafl_cifar_torch_check import _LEAF, flat, flax_to_torch_array  # pylint: disable=g-import-not-at-top

nn = torch.nn



class LuoGenerator(nn.Module):
  """models.Generator(style='luo') in PyTorch, unconditional."""

  def __init__(self, latent_dim: int, image_size: int, channels: int, width: int,
               num_upsample: int = 2):
    super().__init__()
    self.init = image_size // 2**num_upsample
    self.width = width
    self.num_upsample = num_upsample
    self.fc = nn.Linear(latent_dim, width * self.init**2)
    self.bn0 = nn.BatchNorm2d(width, eps=1e-5, momentum=0.1)
    prev = width
    for i in range(num_upsample):
      w = max(width // (i + 1), 1)
      self.add_module(f"conv{i + 1}", nn.Conv2d(prev, w, 3, padding=1))
      self.add_module(f"bn{i + 1}", nn.BatchNorm2d(w, eps=0.8, momentum=0.1))
      prev = w
    self.conv_out = nn.Conv2d(prev, channels, 3, padding=1)
    self.bn_out = nn.BatchNorm2d(channels, eps=0.8, momentum=0.1, affine=True)
    with torch.no_grad():
      self.bn_out.bias.zero_()
    self.bn_out.bias.requires_grad_(False)   # Flax: use_bias=False

  def forward(self, z):
    x = self.fc(z).view(z.shape[0], self.width, self.init, self.init)
    x = F.leaky_relu(self.bn0(x), 0.2)
    for i in range(self.num_upsample):
      x = F.interpolate(x, scale_factor=2, mode="nearest")
      x = getattr(self, f"conv{i + 1}")(x)
      x = F.leaky_relu(getattr(self, f"bn{i + 1}")(x), 0.2)
    return self.bn_out(torch.tanh(self.conv_out(x)))


class LeNet5BN(nn.Module):
  """classifiers.LeNet5(use_bn=True): conv5-BN-relu-pool, conv5-BN-relu-pool, conv5-BN-relu,
  fc-relu, fc."""

  def __init__(self, num_classes=10, widths=(6, 16, 120, 84), channels=1):
    super().__init__()
    c1, c2, c3, f4 = widths
    self.conv1, self.bn1 = nn.Conv2d(channels, c1, 5), nn.BatchNorm2d(c1)
    self.conv2, self.bn2 = nn.Conv2d(c1, c2, 5), nn.BatchNorm2d(c2)
    self.conv3, self.bn3 = nn.Conv2d(c2, c3, 5), nn.BatchNorm2d(c3)
    self.fc1, self.fc2 = nn.Linear(c3, f4), nn.Linear(f4, num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
    x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
    x = F.relu(self.bn3(self.conv3(x))).flatten(1)
    return self.fc2(F.relu(self.fc1(x)))


def load_flax(module, params, batch_stats=None, gen_width: int = 0):
  """Copies Flax params (and batch_stats) into `module`, whose parameters carry the Flax names
  (path joined with '.', leaf renamed: kernel/scale -> weight, mean/var -> running_mean/var)."""
  targets = dict(module.named_parameters())
  targets.update(dict(module.named_buffers()))
  with torch.no_grad():
    for tree in (params, batch_stats or {}):
      for path, x in flat(tree).items():
        name = ".".join(path[:-1] + (_LEAF[path[-1]],))
        t = targets[name]
        src = torch.from_numpy(flax_to_torch_array(path, x, gen_width))
        if tuple(src.shape) != tuple(t.shape):
          raise ValueError(f"{'/'.join(path)} -> {name}: {tuple(src.shape)} vs {tuple(t.shape)}")
        t.copy_(src.to(t.device))


class BNRecorder:
  """Forward pre-hooks on the BatchNorm2d modules `names` of `model`: after a forward pass,
  moments[name] = (per-channel batch mean, biased variance) of that layer's input."""

  def __init__(self, model, names):
    self.moments = {}
    modules = dict(model.named_modules())
    self.handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in names]

  def _hook(self, name):
    def hook(module, inputs):  # pylint: disable=unused-argument
      var, mean = torch.var_mean(inputs[0], dim=(0, 2, 3), correction=0)
      self.moments[name] = (mean, var)
    return hook


def total_variation(x):
  """losses.total_variation on NCHW images."""
  return ((x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
          + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean())


def image_l2_prior(x):
  """losses.image_l2_prior: mean over images of ||x_i||_2 / sqrt(C H W)."""
  f = x.flatten(1)
  return torch.linalg.vector_norm(f, dim=1).mean() / math.sqrt(f.shape[1])


class TorchEnsemble:
  """N generators trained towards their classes against a frozen teacher, one Adam each.

  generators: N LuoGenerator; teacher: a classifier returning logits, put in eval mode and
  frozen here; targets[k]: {bn module name: (mean, var)} of member k; class_ids[k]: its class.
  """

  def __init__(self, generators, teacher, targets, class_ids, latent_dim: int, batch: int,
               lr: float, betas=(0.9, 0.999), w_tv=0.0, w_l2=0.0, w_mm=1.0):
    self.generators, self.teacher = generators, teacher.eval()
    for p in teacher.parameters():
      p.requires_grad_(False)
    self.targets, self.class_ids = targets, list(class_ids)
    self.latent_dim, self.batch = latent_dim, batch
    self.w_tv, self.w_l2, self.w_mm = w_tv, w_l2, w_mm
    self.recorder = BNRecorder(teacher, sorted(targets[0]) if targets else [])
    self.opts = [torch.optim.Adam([p for p in g.parameters() if p.requires_grad], lr=lr,
                                  betas=tuple(betas)) for g in generators]
    self.device = next(teacher.parameters()).device

  def member_loss(self, k: int, z):
    """(loss, {'ce', 'tv', 'l2', 'mm'}) of member k on latents z."""
    g = self.generators[k]
    g.train()
    images = g(z)
    logits = self.teacher(images)
    labels = torch.full((z.shape[0],), self.class_ids[k], dtype=torch.long, device=z.device)
    terms = {"ce": F.cross_entropy(logits, labels), "tv": total_variation(images),
             "l2": image_l2_prior(images)}
    loss = terms["ce"] + self.w_tv * terms["tv"] + self.w_l2 * terms["l2"]
    if self.w_mm > 0:
      mm = sum(torch.linalg.vector_norm(self.recorder.moments[n][0] - mu_t)
               + torch.linalg.vector_norm(self.recorder.moments[n][1] - var_t)
               for n, (mu_t, var_t) in self.targets[k].items())
      terms["mm"] = mm
      loss = loss + self.w_mm * mm
    return loss, terms

  def member_step(self, k: int):
    z = torch.randn(self.batch, self.latent_dim, device=self.device)
    loss, _ = self.member_loss(k, z)
    self.opts[k].zero_grad(set_to_none=True)
    loss.backward()
    self.opts[k].step()

  def step(self):
    for k in range(len(self.generators)):
      self.member_step(k)
