"""Seconds per training step: this project's jitted JAX step beside a PyTorch reference of it.

    python benchmarks/step_speed.py                        # mnist5k,paper_mnist,cifar10,ensemble10
    python benchmarks/step_speed.py --settings=mnist5k,ensemble10 --rounds=5 --reps=5 --out=r.md
    python benchmarks/step_speed.py --settings=cifar10 --cifar_batch=1024        # an accelerator
    python benchmarks/step_speed.py --settings=ensemble10,ensemble100,cifar_ensemble10 \
        --lowering=vmap
    python benchmarks/step_speed.py --settings=mnist5k,ensemble --generators=2 --batch=8 \
        --width=4 --rounds=1 --reps=1                      # a tiny check (tests/test_benchmarks.py)
    python benchmarks/step_speed.py --no_torch             # the project's columns only

PyTorch is optional (`pip install torch==2.13.0`, not a dependency of the package): without
it, or with --no_torch, only the project's columns are printed. Settings (--settings, comma
separated):
  mnist5k      DAFL's joint step (stages/dafl.py: generator + student update) at the mnist5k
               config's setting (configs/mnist5k.py:method=dafl): generator width 16, batch
               256, latent 100, LeNet-5 teacher, LeNet-5-half student. PyTorch: the authors'
               loop (benchmarks/dafl_torch_reference.py TorchDAFL.step: one backward of
               generator loss + KD loss, both Adam steps), latents torch.randn each step.
  paper_mnist  the same at the paper's MNIST setting: width 128, batch 512.
  cifar10      DAFL's joint step at the CIFAR-10 setting (configs/cifar10.py:method=dafl):
               --teacher (ResNet-34) -> --student (ResNet-18), generator width 128, latent
               1000, batch --cifar_batch. PyTorch: the authors' code as transcribed in
               benchmarks/dafl_cifar_torch_check.py (AuthorsDAFL.forward_backward +
               optimizer_steps); it has resnet18 and resnet34 only: for other models the
               PyTorch columns stay empty.
  ensembleN    one step of an ensemble of N per-class generators (stages/ensemble.py) at the
               mnist5k ensemble setting (configs/mnist5k.py:method=ensemble): Luo-style
               generators of width 16, 32 images each, LeNet-5-BN teacher, target-class CE +
               TV/l2 priors + BN moment matching; the lowering is the config's (its per-backend
               default, 'loop' on a CPU, 'vmap' elsewhere) or --lowering. PyTorch: N
               generators, one Adam each, updated in turn (benchmarks/torch_ensemble_reference.py:
               the same loss, teacher BN moments from forward pre-hooks). A second row, project
               only: one single-generator step (ensemble.num_generators = 1, the class-
               conditional generator, lowering 'loop'), whose compile time the ensemble's is
               compared with below the table. `ensemble` alone is N = --generators (default
               10); --generators also overrides the N of every ensembleN. The PyTorch
               reference computes the loss and update only, not the project's metrics
               (gradient norm, agreement with the target class).
  cifar_ensembleN  the same at the CIFAR-10 setting (configs/cifar10.py:method=ensemble): Luo
               generators of width 128, latent 1000, 32 images each, a --teacher (ResNet-34)
               teacher; PyTorch's teacher is the authors' ResNet (resnet18 / resnet34 only).
Teachers are random (weights drawn with numpy on the model's shapes; per-class BN statistics
random too): the cost of a step does not depend on what the teacher learned. The
implementations start from the same generator (and student) weights: the project's initial
ones are copied into the PyTorch modules.

Check (ensemble settings, with PyTorch): member 0's loss at the first step, the project's
`ensemble.member_loss` against the PyTorch reference's on the same weights, BN targets and
latents, both at full float32 precision (no TF32); printed below the table, the script exits
with status 1 when they differ by more than 1e-4 relative. --no_check skips it.

For each setting in turn, both implementations are built and compiled (their first call, the
'compile' columns: tracing + XLA compilation + one step for the project; PyTorch's first step,
with cuDNN's autotuning on a GPU), then timed in --rounds rounds of --reps steps, the
implementations taking turns within each round (the order alternating between rounds), so that
a slow spell of the machine hits both alike, with --pause seconds of idle before each turn (the
other runtime's worker threads spin for a while after its last call). PyTorch flushes denormals
to zero on a CPU (torch.set_flush_denormal, as XLA:CPU does). Every project step is waited for
(jax.block_until_ready on the returned state and metrics); PyTorch steps are synchronous on a
CPU (torch.cuda.synchronize() after each on a GPU).

Prints a header line (backend, device kind, versions, CPU model and flags, PyTorch threads,
date) and one markdown table; --out=FILE appends both to FILE too. Columns:
  project s/step          median over all timed steps of the project's step
  project round medians   min - max of its per-round medians (the spread)
  project compile s       its first call
  PyTorch s/step, PyTorch round medians, PyTorch first call s: the same for PyTorch
  project / PyTorch       ratio of the medians (< 1: the project's step is faster)
A setting that fails is reported below the table and skipped (exit status 1).

On a GPU, PyTorch runs on it too (--torch_device=auto); JAX is then limited to 45% of the GPU's
memory (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set) so that both fit. The DAFL rows' project
step uses every visible device (dafl.build's mesh) and PyTorch one: make one visible
(CUDA_VISIBLE_DEVICES=0) for a one-device comparison; the ensemble rows use one device.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import os
import re
import sys
import time
import traceback
from typing import Any, Callable, Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)
sys.path.insert(0, BENCHMARKS)
# JAX and PyTorch share a GPU: by default JAX would take 75% of its memory at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from datafree_jax import config_lib, input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from datafree_jax.stages import dafl, ensemble  # pylint: disable=g-import-not-at-top,wrong-import-position
from random_teachers import random_teacher  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_SETTINGS = "mnist5k,paper_mnist,cifar10,ensemble10"
AUTHORS_RESNETS = ("resnet18", "resnet34")   # dafl_cifar_torch_check.py's PyTorch models
CHECK_TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------

class Timed:
  """One implementation's step (a no-argument callable that returns when the step is done)."""

  def __init__(self, fn: Callable[[], Any]):
    self.fn = fn
    self.first: Optional[float] = None
    self.times: list = []
    self.round_medians: list = []

  def compile(self):
    t = time.perf_counter()
    self.fn()
    self.first = time.perf_counter() - t

  def run(self, reps: int):
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      self.fn()
      times.append(time.perf_counter() - t)
    self.times += times
    self.round_medians.append(float(np.median(times)))

  def median(self) -> float:
    return float(np.median(self.times))

  def release(self):
    self.fn = None


def jax_timed(step, state) -> Timed:
  """The project's step(state, None) -> (state, metrics), waited for after every call."""
  box = {"state": state}

  def one():
    box["state"], metrics = step(box["state"], None)
    jax.block_until_ready((box["state"], metrics))
  return Timed(one)


@dataclasses.dataclass
class Row:
  setting: str
  step: str
  jax: Timed
  torch: Optional[Timed] = None


@dataclasses.dataclass
class TorchCtx:
  """PyTorch and the device its models run on."""
  torch: Any
  device: Any

  def sync(self):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def timed(self, fn) -> Timed:
    def one():
      fn()
      self.sync()
    return Timed(one)


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
# Configs.
# ---------------------------------------------------------------------------------------------

def load_config(name: str, arg: str):
  return config_lib.load_config_file(os.path.join(REPO, "configs", name), arg)


# ---------------------------------------------------------------------------------------------
# Settings: each returns (rows, notes).
# ---------------------------------------------------------------------------------------------

def mnist_dafl(label: str, width: int, batch: int, tctx: Optional[TorchCtx], notes: list):
  c = load_config("mnist5k.py", "method=dafl")
  c.generator.width, c.student.batch_size = width, batch
  info = input_pipeline.dataset_info("mnist5k")
  teacher = random_teacher(c.teacher.model, info)
  state, step, *_ = dafl.build(c, teacher, info)
  latent = c.generator.latent_dim
  desc = (f"DAFL joint step, {c.teacher.model} -> {c.student.model}, generator width {width}, "
          f"batch {batch}, latent {latent}")
  row = Row(label, desc, None)
  if tctx is not None:
    if (c.teacher.model, c.student.model) != ("lenet5", "lenet5_half"):
      notes.append(f"{label}: no PyTorch reference for {c.teacher.model} -> {c.student.model}")
    else:
      import dafl_torch_reference as ref  # pylint: disable=g-import-not-at-top
      torch, dev = tctx.torch, tctx.device
      t_teacher = ref.torch_teacher(teacher, info)
      td = ref.TorchDAFL(c, t_teacher, info)
      s0 = jax.device_get(state)
      ref.load_into_torch(ref._gen_pairs(td.gen), s0["gen"]["params"], width)  # pylint: disable=protected-access
      ref.load_into_torch(ref._lenet_pairs(td.student), s0["student"]["params"])  # pylint: disable=protected-access
      for m in (t_teacher, td.gen, td.student):
        m.to(dev)
      row.torch = tctx.timed(lambda: td.step(torch.randn(batch, latent, device=dev)))
  row.jax = jax_timed(step, state)
  return [row]


def cifar_dafl(args, tctx: Optional[TorchCtx], notes: list):
  c = load_config("cifar10.py", "method=dafl")
  c.student.batch_size = args.cifar_batch
  c.teacher.model, c.student.model = args.teacher, args.student
  info = input_pipeline.dataset_info("cifar10")
  teacher = random_teacher(c.teacher.model, info, seed=100, width=c.teacher.width)
  state, step, *_ = dafl.build(c, teacher, info)
  g = c.generator
  desc = (f"DAFL joint step, {c.teacher.model} -> {c.student.model}, generator width {g.width}, "
          f"batch {args.cifar_batch}, latent {g.latent_dim}")
  row = Row("cifar10", desc, None)
  if tctx is not None:
    if c.teacher.model not in AUTHORS_RESNETS or c.student.model not in AUTHORS_RESNETS:
      notes.append(f"cifar10: no PyTorch column: the authors' PyTorch code has "
                   f"{' and '.join(AUTHORS_RESNETS)} only (asked: {c.teacher.model} -> "
                   f"{c.student.model})")
    elif (g.width, g.num_upsample, g.style) != (128, 2, "dafl") or c.student.width not in (0, 64):
      notes.append("cifar10: no PyTorch column: the authors' generator has width 128 and two "
                   "upsamplings, their ResNets width 64")
    else:
      import dafl_cifar_torch_check as chk  # pylint: disable=g-import-not-at-top
      torch, dev = tctx.torch, tctx.device
      nets = {"resnet18": chk.authors_resnet18, "resnet34": chk.authors_resnet34}
      s0 = jax.device_get(state)
      t_gen = chk.AuthorsGenerator(info.image_size, g.latent_dim, info.channels)
      chk.load_into_torch(t_gen, s0["gen"]["params"], s0["gen"]["batch_stats"], generator=True,
                          gen_width=g.width)
      t_teacher = nets[c.teacher.model](info.num_classes)
      tv = jax.device_get(teacher["variables"])
      chk.load_into_torch(t_teacher, tv["params"], tv["batch_stats"])
      for p in t_teacher.parameters():
        p.requires_grad_(False)
      t_student = nets[c.student.model](info.num_classes)
      chk.load_into_torch(t_student, s0["student"]["params"], s0["student"]["batch_stats"])
      for m in (t_gen, t_teacher, t_student):
        m.to(dev)
      authors = chk.AuthorsDAFL(c, t_teacher, t_gen, t_student)

      def one():
        authors.forward_backward(torch.randn(args.cifar_batch, g.latent_dim, device=dev))
        authors.optimizer_steps()
      row.torch = tctx.timed(one)
  row.jax = jax_timed(step, state)
  return [row]


def ensemble_config(cifar: bool, n: int, args):
  if cifar:
    cfg = load_config("cifar10.py", "method=ensemble")
    cfg.teacher.model = args.teacher
  else:
    cfg = load_config("mnist5k.py", "method=ensemble")
  cfg.ensemble.num_generators = n
  if args.width:
    cfg.generator.width = args.width
  if args.batch:
    cfg.ensemble.batch_per_generator = args.batch
  if args.lowering:
    cfg.ensemble.lowering = args.lowering
  if args.at_once:
    cfg.ensemble.max_generators_per_device_at_once = args.at_once
  return cfg


def _bn_module_names(cifar: bool, layer_paths):
  """{Flax BN layer path: PyTorch module name} of the teacher."""
  if not cifar:
    return {p: ".".join(p) for p in layer_paths}
  import dafl_cifar_torch_check as chk  # pylint: disable=g-import-not-at-top
  return {p: chk.torch_name(p + ("mean",), False).rsplit(".", 1)[0] for p in layer_paths}


def torch_ensemble(cfg, cifar: bool, info, teacher, ens, tctx: TorchCtx):
  """The PyTorch reference of `ens` (torch_ensemble_reference.TorchEnsemble), from the same
  initial generator weights and the same BN targets."""
  import torch_ensemble_reference as ter  # pylint: disable=g-import-not-at-top
  torch, dev = tctx.torch, tctx.device
  g, e, n = cfg.generator, cfg.ensemble, ens.num_generators
  members = jax.device_get({k: ens.state[k] for k in ("params", "batch_stats")})
  gens = []
  for k in range(n):
    gen = ter.LuoGenerator(g.latent_dim, info.image_size, info.channels, g.width, g.num_upsample)
    ter.load_flax(gen, jax.tree.map(lambda x, k=k: x[k], members["params"]),
                  jax.tree.map(lambda x, k=k: x[k], members["batch_stats"]), gen_width=g.width)
    gens.append(gen.to(dev))
  tv = jax.device_get(teacher["variables"])
  if cifar:
    import dafl_cifar_torch_check as chk  # pylint: disable=g-import-not-at-top
    t_teacher = {"resnet18": chk.authors_resnet18,
                 "resnet34": chk.authors_resnet34}[cfg.teacher.model](info.num_classes)
    chk.load_into_torch(t_teacher, tv["params"], tv["batch_stats"])
  else:
    t_teacher = ter.LeNet5BN(info.num_classes, channels=info.channels)
    ter.load_flax(t_teacher, tv["params"], tv["batch_stats"])
  t_teacher.to(dev)
  flat = ter.flat(jax.device_get(ens.consts["targets"]))
  layers = sorted({p[:-1] for p in flat})
  names = _bn_module_names(cifar, layers)
  targets = [{names[p]: tuple(torch.tensor(np.asarray(flat[p + (m,)][k]), device=dev)
                              for m in ("mean", "var")) for p in layers} for k in range(n)]
  return ter.TorchEnsemble(gens, t_teacher, targets, ens.class_ids[:n], g.latent_dim,
                           int(e.batch_per_generator), e.lr, (e.b1, e.b2), e.w_tv, e.w_l2,
                           e.w_mm)


def check_member_loss(cfg, info, teacher, ens, ref, tctx: TorchCtx, members0):
  """(project loss, PyTorch loss) of member 0 at step 0 on the same weights and latents."""
  torch = tctx.torch
  spec = ensemble.member_spec(cfg, info, teacher["model"])
  key = ensemble.member_key(cfg.seed, 0, 0)
  z = jax.random.normal(jax.random.split(key)[0], (spec.batch, spec.gen.latent_dim))
  pick = lambda t: jax.tree.map(lambda x: x[0], t)
  loss_fn = jax.jit(lambda p, bs, t, c, k, tv: ensemble.member_loss(spec, p, bs, t, c, k, tv)[0])
  with jax.default_matmul_precision("highest"):
    ours = float(loss_fn(members0["params"], members0["batch_stats"],
                         pick(ens.consts["targets"]), ens.consts["class_id"][0], key,
                         teacher["variables"]))
  with Tf32Off(torch), torch.no_grad():
    theirs = float(ref.member_loss(0, torch.from_numpy(np.asarray(z)).to(tctx.device))[0])
  return ours, theirs


def ensemble_setting(cifar: bool, n: int, args, tctx: Optional[TorchCtx], notes: list,
                     failures: list):
  cfg = ensemble_config(cifar, n, args)
  label = f"{'cifar_' if cifar else ''}ensemble{n}"
  info = input_pipeline.dataset_info(cfg.dataset)
  teacher = random_teacher(cfg.teacher.model, info, seed=0, width=cfg.teacher.width,
                           class_stats=True)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("gen",))
  ens = ensemble.build(cfg, teacher, info, mesh)
  g, e = cfg.generator, cfg.ensemble
  desc = (f"one step of {n} {e.style} generators (width {g.width}, latent {g.latent_dim}, "
          f"{e.batch_per_generator} images each), {cfg.teacher.model} teacher, lowering "
          f"'{ens.lowering}'")
  row = Row(label, desc, None)
  rows = [row]
  if tctx is not None:
    why = ""
    supported = AUTHORS_RESNETS if cifar else ("lenet5_bn",)
    if n == 1:
      why = "G = 1 is the class-conditional generator, which the reference does not have"
    elif cfg.teacher.model not in supported or cfg.teacher.width not in (0, 64):
      why = f"the reference's teachers are {', '.join(supported)} (asked: {cfg.teacher.model})"
    elif (e.style, e.loss, e.mm_form, cfg.dtype) != ("luo", "luo", "l2", "float32"):
      why = "the reference is style 'luo', loss 'luo', moment matching 'l2', float32"
    if why:
      notes.append(f"{label}: no PyTorch column: {why}")
    else:
      members0 = jax.device_get({k: jax.tree.map(lambda x: x[0], ens.state[k])
                                 for k in ("params", "batch_stats")})
      ref = torch_ensemble(cfg, cifar, info, teacher, ens, tctx)
      if not args.no_check:
        ours, theirs = check_member_loss(cfg, info, teacher, ens, ref, tctx, members0)
        rel = abs(ours - theirs) / max(abs(theirs), 1e-12)
        ok = rel <= CHECK_TOL
        notes.append(f"{label}: check, member 0's loss at step 0 on the same weights and "
                     f"latents: project {ours:.7g}, PyTorch {theirs:.7g}, relative difference "
                     f"{rel:.1e} (tolerance {CHECK_TOL:.0e}): {'ok' if ok else 'MISMATCH'}")
        print(notes[-1], flush=True)
        if not ok:
          failures.append(f"{label}: member loss check")
      row.torch = tctx.timed(ref.step)
  row.jax = jax_timed(ens.step, ens.state)
  if not args.no_single:
    one_cfg = cfg.copy_and_resolve_references()
    one_cfg.ensemble.num_generators, one_cfg.ensemble.lowering = 1, "loop"
    one = ensemble.build(one_cfg, teacher, info, mesh)
    rows.append(Row(f"{label} (G=1)", "one single-generator step (ensemble.num_generators 1: "
                    "the class-conditional generator), lowering 'loop'",
                    jax_timed(one.step, one.state)))
  return rows


def parse_settings(text: str, generators: int):
  """[(kind, N or None)] of --settings; raises ValueError on an unknown one."""
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


def build_setting(kind: str, n, args, tctx, notes: list, failures: list) -> list:
  if kind == "mnist5k":
    return mnist_dafl("mnist5k", args.width or 16, args.batch or 256, tctx, notes)
  if kind == "paper_mnist":
    return mnist_dafl("paper_mnist", args.width or 128, args.batch or 512, tctx, notes)
  if kind == "cifar10":
    return cifar_dafl(args, tctx, notes)
  return ensemble_setting(kind == "cifar_ensemble", n, args, tctx, notes, failures)


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------

def cpu_info():
  """(model name, {flag: bool}) from /proc/cpuinfo, or (None, {}) without it."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      text = f.read()
  except OSError:
    return None, {}
  model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
  flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
  have = set(flags.group(1).split()) if flags else set()
  return (model.group(1).strip() if model else "unknown",
          {f: f in have for f in ("avx512f", "avx512_bf16", "avx2")})


def version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def header(argv, tctx: Optional[TorchCtx], torch) -> list:
  dev = jax.devices()[0]
  model, flags = cpu_info()
  cpu = "no /proc/cpuinfo"
  if model is not None:
    cpu = f"CPU {model} (" + ", ".join(f"{k} {'yes' if v else 'no'}"
                                       for k, v in flags.items()) + ")"
  if torch is None:
    t = "torch not installed"
  else:
    t = f"torch {torch.__version__} ({torch.get_num_threads()} threads"
    t += f", device {tctx.device})" if tctx is not None else ", not used)"
  line = (f"backend {jax.default_backend()}, device kind {dev.device_kind} "
          f"({jax.device_count()} device(s)); jax {jax.__version__}, jaxlib "
          f"{version('jaxlib')}, flax {version('flax')}, {t}; {cpu}; "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}")
  lines = [f"### benchmarks/step_speed.py {' '.join(argv)}".rstrip(), "", line]
  if tctx is not None and tctx.device.type == "cuda":
    b = torch.backends
    lines.append(f"PyTorch GPU: {torch.cuda.get_device_name(tctx.device)}, cuDNN benchmark "
                 f"{b.cudnn.benchmark}, TF32 convolutions {b.cudnn.allow_tf32}, matmuls "
                 f"{b.cuda.matmul.allow_tf32}; JAX default matmul precision "
                 f"{jax.config.jax_default_matmul_precision or 'default'}")
  return lines


def _f(x: Optional[float]) -> str:
  return "-" if x is None else f"{x:.3g}"


def _spread(t: Optional[Timed]) -> str:
  if t is None or not t.round_medians:
    return "-"
  return f"{min(t.round_medians):.3g} - {max(t.round_medians):.3g}"


def table(rows: list, with_torch: bool) -> list:
  cols = ["setting", "step", "project s/step", "project round medians", "project compile s"]
  if with_torch:
    cols += ["PyTorch s/step", "PyTorch round medians", "PyTorch first call s",
             "project / PyTorch"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    j = r.jax
    cells = [r.setting, r.step, _f(j.median()), _spread(j), _f(j.first)]
    if with_torch:
      t = r.torch
      if t is None:
        cells += ["-", "-", "-", "-"]
      else:
        cells += [_f(t.median()), _spread(t), _f(t.first), f"{j.median() / t.median():.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


# ---------------------------------------------------------------------------------------------

def import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--settings", default=DEFAULT_SETTINGS,
                 help="comma-separated: mnist5k, paper_mnist, cifar10, ensembleN, "
                      "cifar_ensembleN (default %(default)s)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--reps", type=int, default=5,
                 help="timed steps per implementation and round")
  p.add_argument("--cifar_batch", type=int, default=32, help="batch of the cifar10 setting")
  p.add_argument("--teacher", default="resnet34",
                 help="teacher of the cifar10 and cifar_ensembleN settings")
  p.add_argument("--student", default="resnet18", help="student of the cifar10 setting")
  p.add_argument("--generators", type=int, default=0,
                 help="N of every ensemble setting (0: the N in its name, 10 for 'ensemble')")
  p.add_argument("--lowering", default="", choices=("", "auto", "loop", "vmap"),
                 help="ensemble lowering ('': the config's, i.e. the per-backend default)")
  p.add_argument("--at_once", type=int, default=0,
                 help="ensemble.max_generators_per_device_at_once of the 'vmap' lowering (0: "
                      "the config's, all members at once)")
  p.add_argument("--batch", type=int, default=0,
                 help="batch of the mnist5k / paper_mnist settings and images per generator "
                      "of the ensemble settings (0: each setting's)")
  p.add_argument("--width", type=int, default=0,
                 help="generator width of the mnist5k / paper_mnist / ensemble settings (0: "
                      "each setting's)")
  p.add_argument("--no_torch", action="store_true", help="the project's columns only")
  p.add_argument("--torch_device", default="auto", choices=("auto", "cpu", "cuda"),
                 help="where the PyTorch reference runs (auto: cuda when available)")
  p.add_argument("--torch_threads", type=int, default=0,
                 help="torch.set_num_threads (0: PyTorch's default)")
  p.add_argument("--no_check", action="store_true",
                 help="skip the ensemble settings' member-loss check")
  p.add_argument("--no_single", action="store_true",
                 help="skip the ensemble settings' single-generator row")
  p.add_argument("--pause", type=float, default=0.2,
                 help="seconds of idle before each implementation's turn in a round")
  p.add_argument("--out", default="", help="also append the header and table to this file")
  argv = sys.argv[1:] if argv is None else argv
  args = p.parse_args(argv)
  if args.rounds < 1 or args.reps < 1:
    p.error("--rounds and --reps must be at least 1")
  try:
    settings = parse_settings(args.settings, args.generators)
  except ValueError as e:
    p.error(str(e))

  torch = None if args.no_torch else import_torch()
  tctx = None
  if torch is not None:
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    want = args.torch_device
    if want == "auto":
      want = "cuda" if torch.cuda.is_available() else "cpu"
    elif want == "cuda" and not torch.cuda.is_available():
      p.error("--torch_device=cuda, but PyTorch sees no CUDA device")
    tctx = TorchCtx(torch, torch.device(want))
    if want == "cuda":
      torch.backends.cudnn.benchmark = True   # as XLA autotunes its convolutions
    torch.manual_seed(0)
    if want == "cpu":
      # XLA:CPU flushes denormals to zero; PyTorch does not by default, and the DAFL generator
      # (lr 0.2) drifts into denormal values that make PyTorch's CPU steps up to 10x slower.
      torch.set_flush_denormal(True)

  head = header(argv, tctx, torch)
  print("\n".join(head[2:]), flush=True)
  rows, notes, failures = [], [], []
  for kind, n in settings:
    name = kind if n is None else f"{kind}{n}"
    got: list = []
    try:
      got = build_setting(kind, n, args, tctx, notes, failures)
      for row in got:
        for who, impl in (("project", row.jax), ("PyTorch", row.torch)):
          if impl is not None:
            impl.compile()
            print(f"{row.setting}: {who} first call (compile) {impl.first:.3g} s", flush=True)
      for r in range(args.rounds):
        for row in got:
          impls = [i for i in (row.jax, row.torch) if i is not None]
          for impl in impls if r % 2 == 0 else impls[::-1]:
            time.sleep(args.pause)   # the other runtime's spinning worker threads settle
            impl.run(args.reps)
        print(f"{name} round {r + 1}/{args.rounds}: " + "; ".join(
            f"{row.setting} project {row.jax.round_medians[-1]:.3g}"
            + (f", PyTorch {row.torch.round_medians[-1]:.3g}" if row.torch else "")
            for row in got) + " s/step", flush=True)
      rows += got
      single = [r for r in got if r.setting.endswith("(G=1)")]
      if single:
        a, b = got[0].jax.first, single[0].jax.first
        notes.append(f"{got[0].setting}: compile (first call) of the {n}-generator step / of "
                     f"the single-generator step: {a:.1f} s / {b:.1f} s = {a / b:.2f}")
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      notes.append(f"{name}: FAILED: {type(e).__name__}: {e}")
      failures.append(name)
    finally:
      for row in got:
        for impl in (row.jax, row.torch):
          if impl is not None:
            impl.release()
      gc.collect()
      if tctx is not None and tctx.device.type == "cuda":
        torch.cuda.empty_cache()

  out = list(head) + [""]
  if tctx is None:
    out.append(("--no_torch" if args.no_torch else "PyTorch is not installed")
               + ": the project's columns only.")
    out.append("")
  out += table(rows, tctx is not None)
  out.append("")
  out.append(f"{args.rounds} rounds of {args.reps} timed steps per implementation. s/step: "
             "median of all timed steps; round medians: min - max of the per-round medians; "
             "compile / first call: the first step, compilation included"
             + ("; project / PyTorch: ratio of the medians (< 1: the project is faster)."
                if tctx is not None else "."))
  if notes:
    out.append("")
    out += [f"- {n}" for n in notes]
  text = "\n".join(out) + "\n"
  print("\n" + "\n".join(out[2:]), flush=True)
  if args.out:
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(text + "\n")
  if failures:
    print(f"failed: {', '.join(failures)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
