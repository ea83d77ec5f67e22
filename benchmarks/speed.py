"""The steps the speed benchmarks time (step_speed, dafl_step_speed, ensemble_step_speed): the
project's jitted steps and, given PyTorch, their references (torch_dafl's transcription of the
authors' DAFL loop, torch_ensemble's ensemble step), built from the same initial weights."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp

from benchmarks import common, project

CHECK_TOL = 1e-4   # the ensemble settings' member-loss check, relative


@dataclasses.dataclass
class Row:
  """One table row: the project's step and, where there is one, PyTorch's."""
  setting: str
  step: str
  jax: common.Timed
  torch: Optional[common.Timed] = None

  def timed(self) -> list:
    return [t for t in (self.jax, self.torch) if t is not None]


@dataclasses.dataclass
class TorchCtx:
  """PyTorch and the device its models run on."""
  torch: Any
  device: Any

  def timed(self, name: str, fn) -> common.Timed:
    """A Timed of fn, synchronised after each call on a GPU."""
    def one():
      fn()
      if self.device.type == "cuda":
        self.torch.cuda.synchronize()
    return common.Timed(name, one)


class Tf32Off:
  """PyTorch without TF32 inside the block (the check compares float32 to float32)."""

  def __init__(self, torch):
    self.torch = torch

  def __enter__(self):
    b = self.torch.backends
    self.saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = False

  def __exit__(self, *exc):
    b = self.torch.backends
    b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = self.saved


# ---------------------------------------------------------------------------------------------
# DAFL.
# ---------------------------------------------------------------------------------------------

def mnist_dafl_config(width: int, batch: int, latent: int = 0):
  """configs/mnist5k.py (method dafl) at generator width `width` and batch `batch` (latent
  size `latent`, 0: the config's)."""
  c = project.load_config("mnist5k", "method=dafl")
  c.generator.width, c.student.batch_size = width, batch
  if latent:
    c.generator.latent_dim = latent
  return c


def cifar_dafl_config(batch: int, teacher: str, student: str):
  """configs/cifar10.py (method dafl) at batch `batch` with the given teacher and student."""
  c = project.load_config("cifar10", "method=dafl")
  c.student.batch_size = batch
  c.teacher.model, c.student.model = teacher, student
  return c


def dafl_row(label: str, config, teacher_seed: int, tctx: Optional[TorchCtx],
             notes: list) -> Row:
  """The project's DAFL joint step on `config` with a random teacher, and, with `tctx`, the
  authors' loop (torch_dafl) from the same initial generator and student, latents from
  torch.randn each step."""
  info = project.dataset_info(config.dataset)
  teacher = project.random_teacher(config.teacher.model, info, seed=teacher_seed,
                                   width=config.teacher.width)
  state, step, *_ = project.build_dafl(config, teacher, info)
  g = config.generator
  row = Row(label, f"DAFL joint step, {config.teacher.model} -> {config.student.model}, "
            f"generator width {g.width}, batch {config.student.batch_size}, latent "
            f"{g.latent_dim}", None)
  if tctx is not None:
    from benchmarks import torch_dafl  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    why = torch_dafl.unsupported(config)
    if why:
      notes.append(f"{label}: no PyTorch column: {why}")
    else:
      torch, dev = tctx.torch, tctx.device
      t_teacher = torch_dafl.teacher_module(config.teacher.model, info,
                                            jax.device_get(teacher["variables"]), device=dev)
      authors = torch_dafl.build(config, info, t_teacher, jax.device_get(state), device=dev)
      batch = config.student.batch_size
      row.torch = tctx.timed(f"{label} PyTorch",
                             lambda: authors.step(torch.randn(batch, g.latent_dim, device=dev)))
  row.jax = common.jax_timed(f"{label} project", step, state)
  return row


# ---------------------------------------------------------------------------------------------
# The generator ensemble.
# ---------------------------------------------------------------------------------------------

def ensemble_config(cifar: bool, n: int, teacher: str = "", width: int = 0, batch: int = 0,
                    lowering: str = "", at_once: int = 0):
  """The ensemble setting of configs/cifar10.py (cifar) or configs/mnist5k.py with `n`
  generators; each other argument, when set, overrides the config's."""
  cfg = project.load_config("cifar10" if cifar else "mnist5k", "method=ensemble")
  cfg.ensemble.num_generators = n
  if cifar and teacher:
    cfg.teacher.model = teacher
  if width:
    cfg.generator.width = width
  if batch:
    cfg.ensemble.batch_per_generator = batch
  if lowering:
    cfg.ensemble.lowering = lowering
  if at_once:
    cfg.ensemble.max_generators_per_device_at_once = at_once
  return cfg


def ensemble_teacher(cfg):
  """(dataset info, a random teacher with random per-class BN statistics) of `cfg`."""
  info = project.dataset_info(cfg.dataset)
  return info, project.random_teacher(cfg.teacher.model, info, seed=0, width=cfg.teacher.width,
                                      class_stats=True)


def _ensemble_torch_unsupported(cfg, n: int) -> str:
  from benchmarks import torch_dafl  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  e = cfg.ensemble
  if n == 1:
    return "G = 1 is the class-conditional generator, which the reference does not have"
  why = torch_dafl.classifier_unsupported(cfg.teacher.model, cfg.teacher.width)
  if why:
    return f"teacher: {why}"
  if (e.style, e.loss, e.mm_form, cfg.dtype) != ("luo", "luo", "l2", "float32"):
    return "the reference is style 'luo', loss 'luo', moment matching 'l2', float32"
  return ""


def ensemble_rows(label: str, cfg, tctx: Optional[TorchCtx], notes: list, failures: list,
                  check: bool = True, single: bool = True) -> list:
  """One step of the project's ensemble of `cfg` and, with `tctx`, of the PyTorch reference
  from the same initial weights (check: first member 0's loss of both on the same latents,
  against CHECK_TOL); single: a second row, one single-generator step (the class-conditional
  generator, lowering 'loop')."""
  info, teacher = ensemble_teacher(cfg)
  ens = project.build_ensemble(cfg, teacher, info)
  g, e, n = cfg.generator, cfg.ensemble, cfg.ensemble.num_generators
  row = Row(label, f"one step of {n} {e.style} generators (width {g.width}, latent "
            f"{g.latent_dim}, {e.batch_per_generator} images each), {cfg.teacher.model} "
            f"teacher, lowering '{ens.lowering}'", None)
  rows = [row]
  if tctx is not None:
    why = _ensemble_torch_unsupported(cfg, n)
    if why:
      notes.append(f"{label}: no PyTorch column: {why}")
    else:
      from benchmarks import torch_ensemble  # pylint: disable=g-import-not-at-top,import-outside-toplevel
      ref = torch_ensemble.from_project(cfg, info, teacher, ens, tctx.device)
      if check:
        ours, z = project.ensemble_member0_loss(cfg, info, teacher, ens)
        torch = tctx.torch
        with Tf32Off(torch), torch.no_grad():
          theirs = float(ref.member_loss(0, torch.from_numpy(z).to(tctx.device))[0])
        rel = abs(ours - theirs) / max(abs(theirs), 1e-12)
        ok = rel <= CHECK_TOL
        notes.append(f"{label}: check, member 0's loss at step 0 on the same weights and "
                     f"latents: project {ours:.7g}, PyTorch {theirs:.7g}, relative difference "
                     f"{rel:.1e} (tolerance {CHECK_TOL:.0e}): {'ok' if ok else 'MISMATCH'}")
        print(notes[-1], flush=True)
        if not ok:
          failures.append(f"{label}: member loss check")
      row.torch = tctx.timed(f"{label} PyTorch", ref.step)
  row.jax = common.jax_timed(f"{label} project", ens.step, ens.state)
  if single:
    one_cfg = cfg.copy_and_resolve_references()
    one_cfg.ensemble.num_generators, one_cfg.ensemble.lowering = 1, "loop"
    one = project.build_ensemble(one_cfg, teacher, info)
    rows.append(Row(f"{label} (G=1)", "one single-generator step (ensemble.num_generators 1: "
                    "the class-conditional generator), lowering 'loop'",
                    common.jax_timed(f"{label} (G=1) project", one.step, one.state)))
  return rows


LOWERINGS = ("loop", "vmap", "unroll", "separate")


def ensemble_lowering_timed(cfg, info, teacher, lowering: str) -> common.Timed:
  """One step of cfg's G generators in one of LOWERINGS, named by what it is: the package's
  'loop' or 'vmap' lowering; 'unroll', one jit tracing every member's update (the former CPU
  default); 'separate', G independent single-generator states, one jitted step each."""
  g = cfg.ensemble.num_generators
  cfg = cfg.copy_and_resolve_references()
  if lowering == "separate":
    cfg.ensemble.lowering, cfg.ensemble.num_generators = "loop", 1
    one = project.build_ensemble(cfg, teacher, info)
    states = [jax.tree.map(jnp.copy, one.state) for _ in range(g)]

    def step(states, _):
      out = [one.step(s, None) for s in states]
      return [o[0] for o in out], out[-1][1]
    return common.jax_timed(f"{g} separate jitted single-generator steps", step, states)
  cfg.ensemble.lowering = "loop" if lowering == "unroll" else lowering
  ens = project.build_ensemble(cfg, teacher, info)
  if lowering == "unroll":
    return common.jax_timed(
        f"one step of {g} generators, unrolled in one jit (former CPU default)",
        project.ensemble_unrolled_step(cfg, info, teacher, ens), ens.state)
  return common.jax_timed(f"one step of {g} generators, lowering '{lowering}'", ens.step,
                          ens.state)


# ---------------------------------------------------------------------------------------------
# step_speed's settings.
# ---------------------------------------------------------------------------------------------

def parse_settings(text: str, generators: int):
  """[(kind, N or None)] of step_speed's --settings; raises ValueError on an unknown one."""
  out = []
  for name in [s.strip() for s in text.split(",") if s.strip()]:
    if name in ("mnist5k", "paper_mnist", "cifar10"):
      out.append((name, None))
      continue
    m = re.fullmatch(r"(cifar_)?ensemble(\d*)", name)
    if not m:
      raise ValueError(f"unknown setting {name!r}; settings: mnist5k, paper_mnist, cifar10, "
                       "ensembleN, cifar_ensembleN")
    n = generators or int(m.group(2) or 10)
    if n < 1:
      raise ValueError(f"{name}: at least one generator")
    out.append(("cifar_ensemble" if m.group(1) else "ensemble", n))
  return out


def setting_rows(kind: str, n, args, tctx, notes: list, failures: list) -> list:
  """The rows of one of step_speed's settings (`args`: its parsed arguments)."""
  if kind == "mnist5k":
    return [dafl_row(kind, mnist_dafl_config(args.width or 16, args.batch or 256), 0, tctx,
                     notes)]
  if kind == "paper_mnist":
    return [dafl_row(kind, mnist_dafl_config(args.width or 128, args.batch or 512), 0, tctx,
                     notes)]
  if kind == "cifar10":
    return [dafl_row(kind, cifar_dafl_config(args.cifar_batch, args.teacher, args.student), 100,
                     tctx, notes)]
  cifar = kind == "cifar_ensemble"
  cfg = ensemble_config(cifar, n, args.teacher, args.width, args.batch, args.lowering,
                        args.at_once)
  return ensemble_rows(f"{kind}{n}", cfg, tctx, notes, failures, not args.no_check,
                       not args.no_single)
