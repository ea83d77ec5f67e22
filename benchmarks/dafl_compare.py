"""This project's DAFL step against the authors' (torch_dafl), from the same weights and latents.

The comparisons of dafl_cifar_torch_check (the CIFAR-10 cross-check: every loss term, gradient
leaf, parameter and BN statistic, with tolerances; tests/test_dafl_cifar_torch.py) and of
dafl_torch_reference (the mnist5k parity: one step's agreement, then both trained from the same
initial weights). A Setting builds the DAFL stage once (`project.build_dafl`); a Variant holds
both implementations in one precision from the Setting's initial weights: the JAX step's pieces
(`project.dafl_pieces_fn`, the stage's own building blocks) and the authors' loop
(`torch_dafl.build`, every Flax leaf copied by name).
"""
from __future__ import annotations

import copy
import math
import time

import jax
import numpy as np
import torch

from benchmarks import common, project, torch_dafl

flat, unflat, torch_tree = torch_dafl.flat, torch_dafl.unflat, torch_dafl.torch_tree
BN_CANCELLED = torch_dafl.BN_CANCELLED

# Tolerances of the CIFAR check: loss terms to 1e-5, gradients to 1e-4 relative.
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
# Float64: after the steps, parameters, statistics and images agree to rounding.
PARAM_TOL = 1e-6
# Float32 gradients, all leaves together: a sanity bound above the ReLU-kink floor (~1e-3 at
# batch 8, growing with the batch; see dafl_cifar_torch_check's docstring). It catches a
# missing term, a sign or a scale, not every wrong weight (swapping w_oh and w_a moves grad G by
# ~1.5e-2): the float64 rows and the float32 losses do that.
FLOAT32_GRAD_TOL = 5e-2
LOSSES = ("l_oh", "l_a", "l_ie", "loss_g", "loss_kd")


# ---------------------------------------------------------------------------------------------
# Settings and variants.
# ---------------------------------------------------------------------------------------------

class Setting:
  """The JAX DAFL stage built once on `config` and `teacher` (a teacher dict)."""

  def __init__(self, config, teacher: dict, info):
    why = torch_dafl.unsupported(config)
    if why:
      raise ValueError(f"no PyTorch transcription of this config: {why}")
    self.config, self.teacher, self.info = config, teacher, info
    state, self.step, self.student, self.gen, self.mesh = project.build_dafl(config, teacher,
                                                                             info)
    self.state0 = jax.device_get(state)   # the jitted step donates its input state
    del state
    self.pieces_fn = project.dafl_pieces_fn(config, teacher["model"], self.gen, self.student)
    self.generate_fn = project.generate_fn(self.gen)


def cifar_setting(batch: int = 8, schedule_steps: int = 5, seed: int = 0) -> Setting:
  """configs/cifar10.py (method dafl) with the student's batch and step count changed, and a
  random ResNet-34 teacher (project.random_teacher: every parameter and BN running statistic
  drawn at random, so that the whole weight mapping is exercised)."""
  config = project.load_config("cifar10", f"method=dafl,seed={seed}")
  config.student.batch_size = batch
  config.student.steps = schedule_steps
  g, s = config.generator, config.student
  if (g.width, s.optimizer, s.momentum, s.weight_decay, g.b1, g.b2, tuple(s.boundaries)) != (
      128, "sgd", 0.9, 5e-4, 0.9, 0.999, (0.4, 0.8)):
    raise ValueError("the authors' CIFAR loop: generator width 128, SGD student with momentum "
                     "0.9 and weight decay 5e-4, Adam's default betas, x0.1 at 40% and 80%")
  info = project.dataset_info("cifar10")
  teacher = project.random_teacher(config.teacher.model, info, seed + 100, config.teacher.width)
  return Setting(config, teacher, info)


def _cast(tree, dtype):
  """`tree` with its floating-point leaves as numpy arrays of `dtype`."""
  return jax.tree.map(
      lambda x: np.asarray(x, dtype) if np.issubdtype(np.asarray(x).dtype, np.floating)
      else np.asarray(x), tree)


class Variant:
  """Both implementations in one precision, from the Setting's initial weights.

  float64: JAX runs under `jax.enable_x64` (use `with variant.precision():` around every JAX
  call) on weights and optimiser state cast to float64; PyTorch's modules are float64.
  """

  def __init__(self, setting: Setting, dtype=np.float32):
    self.setting, self.dtype = setting, np.dtype(dtype)
    self.torch_dtype = torch.float64 if self.dtype == np.float64 else torch.float32
    config, info = setting.config, setting.info
    self.teacher_vars = _cast(setting.teacher["variables"], self.dtype)
    self.state0 = _cast(setting.state0, self.dtype)
    t_teacher = torch_dafl.teacher_module(config.teacher.model, info, self.teacher_vars,
                                          dtype=self.torch_dtype)
    self.authors = torch_dafl.build(config, info, t_teacher, self.state0, dtype=self.torch_dtype)
    self.bn_count = _bn_sample_counts(self.authors.generator, self.authors.net)
    self.state = self.state0

  def precision(self):
    return jax.enable_x64(self.dtype == np.float64)

  def latents(self, step: int):
    """The JAX step's latents of step `step` (0-based), as drawn inside the step."""
    return np.array(project.dafl_latents(self.setting.config, step))

  def jax_pieces(self, z, gen=None, student=None, student_images=None):
    """The stage's pieces of one step on latents z, from the initial generator and student or
    the given ones ({'params', 'batch_stats'})."""
    gen = gen or self.state0["gen"]
    student = student or self.state0["student"]
    return jax.device_get(self.setting.pieces_fn(
        self.teacher_vars, gen["params"], gen["batch_stats"], student["params"],
        student["batch_stats"], z, student_images))

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
    return torch_dafl.AuthorsDAFL(self.setting.config, cp(a.teacher), cp(a.generator),
                                  cp(a.net))


def _bn_sample_counts(*modules):
  """{BatchNorm module: values per channel in its last batch} (filled during forward)."""
  counts = {}

  def hook(mod, inputs):
    x = inputs[0]
    counts[mod] = x.numel() // x.shape[1]

  for m in modules:
    for sub in m.modules():
      if isinstance(sub, torch.nn.BatchNorm2d):
        sub.register_forward_pre_hook(hook)
  return counts


# ---------------------------------------------------------------------------------------------
# Rows of the CIFAR check.
# ---------------------------------------------------------------------------------------------

def _nchw_to_nhwc(t):
  return np.ascontiguousarray(t.detach().cpu().numpy().transpose(0, 2, 3, 1))


def _row(quantity, a, b, tol=None, kind="rel"):
  """A table row. kind 'rel': pass when ||a - b|| / ||b|| <= tol; 'loss': pass when
  |a - b| <= tol * max(1, |b|); tol None: information only."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  ab, rel = float(np.max(np.abs(a - b))), common.rel_diff(a, b)
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


def _global_row(quantity, ours, theirs, tol, skip=()):
  """One row over all leaves of two pytrees, as one concatenated vector."""
  a, b = flat(ours), flat(theirs)
  keys = [p for p in sorted(b) if "/".join(p) not in skip]
  return _row(quantity, np.concatenate([np.ravel(a[p]) for p in keys]),
              np.concatenate([np.ravel(b[p]) for p in keys]), tol)


def _torch_grads(authors, like_g, like_s):
  return (torch_tree(authors.generator, like_g, grads=True),
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
  grads_t = _torch_grads(a, v.state0["gen"]["params"], v.state0["student"]["params"])
  a.optimizer_g.zero_grad()
  a.optimizer_s.zero_grad()
  for m, sd in saved:
    m.load_state_dict(sd)
  return j, out_t, grads_t


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
      _row(f"{prefix}teacher features ({feats_t.shape[1]}-d)", j["features"], feats_t.numpy(),
           GRAD_TOL),
  ]
  for k in LOSSES:
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
  g64, s64 = _torch_grads(ref, v.state0["gen"]["params"], v.state0["student"]["params"])
  rows = []
  for name, ours, t32, t64 in (("G", j["g_grads"], grads_t[0], g64),
                               ("S", j["s_grads"], grads_t[1], s64)):
    for who, x in (("JAX float32", ours), ("PyTorch float32 (same code)", t32)):
      label = f"{prefix}grad {name}, {who} vs PyTorch float64"
      rows.append(_global_row(f"{label}, all leaves", x, t64, None, BN_CANCELLED))
      rows += _leaf_rows(label, x, t64, None, False, skip=BN_CANCELLED)
  return rows


def _biased_running_var(v: Variant, module, like, prev_t, prev_fix):
  """PyTorch's running variances with each update's unbiased batch variance turned biased:
  v_fix = (1-m) v_fix_prev + (v_torch - (1-m) v_torch_prev) * (n-1)/n, n values per channel."""
  bns = dict(module.named_modules())
  out = {}
  for path, x in flat(torch_tree(module, like)).items():
    if path[-1] != "var":
      out[path] = x
      continue
    mod = bns[torch_dafl.torch_module_name(module, path[:-1])]
    n, m = v.bn_count[mod], mod.momentum
    out[path] = (1 - m) * prev_fix[path] + (x - (1 - m) * prev_t[path]) * (n - 1) / n
  return out


def steps_rows(v: Variant, steps: int, per_leaf=False, checked=True, prefix=""):
  """Rows comparing `steps` joint steps of the JAX stage's jitted step and the authors' loop.

  checked=False: only step 1's losses have a tolerance (float32, where the steps diverge).
  """
  a, s0 = v.authors, v.state0
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
      for k in LOSSES:
        rows.append(_row(f"{prefix}step {i + 1} (jitted step) loss {k}", metrics[k],
                         terms_t[k], LOSS_TOL if checked or i == 0 else None, kind="loss"))
      tol = GRAD_TOL if checked else FLOAT32_GRAD_TOL if i == 0 else None
      for name, norm in zip(("g", "s"), norms):
        rows.append(_row(f"{prefix}step {i + 1} (jitted step) grad_norm_{name}",
                         metrics[f"grad_norm_{name}"], norm, tol))
      for key, mod, like in (("G", a.generator, gen_bs_like), ("S", a.net, st_bs_like)):
        cur = flat(torch_tree(mod, like))
        fixed[key] = _biased_running_var(v, mod, like, prev_t[key], fixed[key])
        prev_t[key] = cur
    state = jax.device_get(state)
    v.state = state
    after = f"{prefix}after {steps} steps:"
    gen_t = torch_tree(a.generator, s0["gen"]["params"])
    rows += _leaf_rows(f"{after} G param", state["gen"]["params"], gen_t, param_tol, per_leaf,
                       skip=BN_CANCELLED)
    for name in BN_CANCELLED:   # Adam scales their noise gradients: no effect on the output.
      path = tuple(name.split("/"))
      rows.append(_row(f"{after} G param {name} (BN-cancelled, no effect on G)",
                       flat(state["gen"]["params"])[path], flat(gen_t)[path]))
    st_t = torch_tree(a.net, s0["student"]["params"])
    rows += _leaf_rows(f"{after} S param", state["student"]["params"], st_t, param_tol, per_leaf)
    if checked:
      for key, ours, like, mod in (
          ("G", state["gen"]["batch_stats"], gen_bs_like, a.generator),
          ("S", state["student"]["batch_stats"], st_bs_like, a.net)):
        raw = flat(torch_tree(mod, like))
        mine = flat(ours)
        means = unflat({p: x for p, x in mine.items() if p[-1] == "mean"})
        varis = unflat({p: x for p, x in mine.items() if p[-1] == "var"})
        rows += _leaf_rows(f"{after} {key} BN running mean", means,
                           unflat({p: raw[p] for p in flat(means)}), param_tol, False)
        rows += _leaf_rows(f"{after} {key} BN running var as stored (PyTorch: unbiased)",
                           varis, unflat({p: raw[p] for p in flat(varis)}), None, False)
        rows += _leaf_rows(f"{after} {key} BN running var, PyTorch's made biased", varis,
                           unflat({p: fixed[key][p] for p in flat(varis)}), param_tol, False)
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


def check_rows(setting: Setting, steps=3, per_leaf=False, divergence=False):
  """All rows of the CIFAR check: float64 (one step, `steps` steps), then float32 (divergence:
  also the authors' code in float32 against itself in float64 after the steps)."""
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
  return rows


def format_table(rows) -> str:
  cells = []
  for r in rows:
    if r["tol"] is None:
      tol, res = "-", "info"
    else:
      tol = (f"{r['tol']:.0e} abs (rel if |x|>1)" if r["kind"] == "loss"
             else f"{r['tol']:.0e} rel")
      res = "pass" if r["ok"] else "FAIL"
    cells.append([r["quantity"], f"{r['abs']:.2e}", f"{r['rel']:.2e}", tol, res])
  return "\n".join(common.markdown_table(
      ["quantity", "max abs diff", "rel diff", "tolerance", "result"], cells))


# ---------------------------------------------------------------------------------------------
# The mnist5k parity: one step's agreement, then training.
# ---------------------------------------------------------------------------------------------

def agreement(setting: Setting, check_after: int):
  """Rows (when, quantity, value) comparing one float32 step of both implementations: from the
  stage's initial weights and the latents of its first step, then again after `check_after`
  steps of the authors' loop (latents torch.randn after torch.manual_seed(config.seed)), its
  weights copied into JAX (saturated generator, trained student). The JAX student distils on
  PyTorch's images, so that its gradient is compared on the same inputs."""
  v = Variant(setting, np.float32)
  a, s0, config = v.authors, v.state0, setting.config
  rows = []

  def compare(when, z):
    images_t, _, _, t_terms = a.forward_backward(torch.from_numpy(np.array(z)))
    images_t = _nchw_to_nhwc(images_t)
    weights = {k: {"params": torch_tree(m, s0[k]["params"]), "batch_stats": s0[k]["batch_stats"]}
               for k, m in (("gen", a.generator), ("student", a.net))}
    j = v.jax_pieces(z, weights["gen"], weights["student"], student_images=images_t)
    rows.append((when, "generated images, largest absolute difference",
                 f"{float(np.max(np.abs(j['images'] - images_t))):.1e}"))
    for k in ("l_oh", "l_a", "l_ie", "loss_kd"):
      rows.append((when, f"{k}: jax / torch", f"{float(j['terms'][k]):.6f} / {t_terms[k]:.6f}"))
    grads_t = _torch_grads(a, s0["gen"]["params"], s0["student"]["params"])
    for name, ours, theirs in (("generator", j["g_grads"], grads_t[0]),
                               ("student", j["s_grads"], grads_t[1])):
      ours, theirs = flat(ours), flat(theirs)
      diffs = {".".join(p): common.rel_diff(ours[p], theirs[p]) for p in theirs
               if "/".join(p) not in BN_CANCELLED}
      worst = max(diffs, key=diffs.get)
      rows.append((when, f"{name} gradient, largest relative difference",
                   f"{diffs[worst]:.1e} ({worst})"))
    # Per-channel biases right before a BatchNorm are removed by it: gradient 0 up to rounding.
    ours, theirs = flat(j["g_grads"]), flat(grads_t[0])
    largest = max(max(float(np.max(np.abs(ours[p]))), float(np.max(np.abs(theirs[p]))))
                  for p in (tuple(n.split("/")) for n in BN_CANCELLED))
    rows.append((when, "conv1, conv2 biases (a BatchNorm follows: gradient 0 up to rounding), "
                 "largest absolute gradient, both", f"{largest:.1e}"))

  z0 = v.latents(0)
  compare("step 1 (same init)", z0)
  torch.manual_seed(config.seed)
  for _ in range(check_after):
    a.step(torch.randn(config.student.batch_size, config.generator.latent_dim))
  compare(f"after {check_after} PyTorch steps",
          np.asarray(jax.random.normal(jax.random.key(12345), z0.shape)))
  return rows


TORCH, JAX = "PyTorch (authors' loop)", "JAX (stages/dafl.py)"


def train_both(config, teacher, info, t_teacher, test, test_torch, eval_every: int, impls,
               init: str = "jax"):
  """{impl: ([(step, accuracy)], seconds per step)} for PyTorch and/or JAX (`impls`).

  t_teacher: the teacher as a PyTorch module; test_torch: the test split as (NCHW images,
  labels) tensors; init: 'jax' (PyTorch starts from the JAX stage's initial weights of the
  seed) or 'own' (PyTorch's default initialisation after torch.manual_seed(config.seed)).
  """
  out = {}
  if "torch" in impls:
    state = jax.device_get(project.build_dafl(config, teacher, info)[0]) if init == "jax" else None
    torch.manual_seed(config.seed)
    authors = torch_dafl.build(config, info, t_teacher, state)
    batch, latent = config.student.batch_size, config.generator.latent_dim
    out[TORCH] = _timed_steps(config.student.steps,
                              lambda: authors.step(torch.randn(batch, latent)),
                              lambda: torch_dafl.accuracy(authors.net, *test_torch), eval_every,
                              "PyTorch")
  if "jax" in impls:
    state, step_jit, student, _, mesh = project.build_dafl(config, teacher, info)
    accuracy = project.student_accuracy_fn(student, test, mesh)
    box = {"state": state}

    def step():
      box["state"], _ = step_jit(box["state"], None)
      jax.block_until_ready(box["state"])
    out[JAX] = _timed_steps(config.student.steps, step, lambda: accuracy(box["state"]),
                            eval_every, "JAX")
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
