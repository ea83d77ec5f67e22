"""A PyTorch reference of one generator-ensemble step (stages/ensemble.py, Luo et al. 2020).

Used by step_speed's rows ensembleN and cifar_ensembleN; it needs PyTorch (`pip install
torch==2.13.0`: the reference only, not a dependency of the package). Teachers (the authors'
ResNets, LeNet-5-BN) and the Flax -> PyTorch weight copy are torch_dafl's.

What one member update of the project computes (`ensemble.objective.member_update` with loss 'luo'), in
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
torch_dafl.load_flax copies a Flax member's parameters by name.
"""
from __future__ import annotations

import math

import jax
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import torch_dafl

nn = torch.nn


class LuoGenerator(nn.Module):
  """models.Generator(style='luo') in PyTorch, unconditional."""
  without_flax_source = ("bn_out.bias",)   # frozen at 0: Flax has no offset there

  def __init__(self, latent_dim: int, image_size: int, channels: int, width: int,
               num_upsample: int = 2):
    super().__init__()
    self.init = image_size // 2**num_upsample
    self.width = self.dense_channels = width
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
    self.generators, self.teacher = generators, torch_dafl.freeze(teacher)
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


def from_project(config, info, teacher: dict, ens, device) -> TorchEnsemble:
  """The reference of the project's ensemble `ens` (project.build_ensemble of `config` and the
  `teacher` dict) on `device`: the same initial generator weights, teacher and BN targets."""
  g, e, n = config.generator, config.ensemble, ens.num_generators
  members = jax.device_get({k: ens.state[k] for k in ("params", "batch_stats")})
  gens = []
  for k in range(n):
    gen = LuoGenerator(g.latent_dim, info.image_size, info.channels, g.width, g.num_upsample)
    member = jax.tree.map(lambda x, k=k: x[k], members)
    torch_dafl.load_flax(gen, member["params"], member["batch_stats"])
    gens.append(gen.to(device))
  t_teacher = torch_dafl.teacher_module(config.teacher.model, info,
                                        jax.device_get(teacher["variables"]), device=device)
  flat = torch_dafl.flat(jax.device_get(ens.consts["targets"]))
  layers = sorted({p[:-1] for p in flat})
  names = {p: torch_dafl.torch_module_name(t_teacher, p) for p in layers}
  targets = [{names[p]: tuple(torch.tensor(np.asarray(flat[p + (m,)][k]), device=device)
                              for m in ("mean", "var")) for p in layers} for k in range(n)]
  return TorchEnsemble(gens, t_teacher, targets, ens.class_ids[:n], g.latent_dim,
                       int(e.batch_per_generator), e.lr, (e.b1, e.b2), e.w_tv, e.w_l2, e.w_mm)
