"""Seconds per training step: this project's jitted JAX step beside a PyTorch reference of it.

    python -m benchmarks.step_speed                        # mnist5k,paper_mnist,cifar10,ensemble10
    python -m benchmarks.step_speed --settings=mnist5k,ensemble10 --rounds=5 --reps=5 --out=r.md
    python -m benchmarks.step_speed --settings=cifar10 --cifar_batch=1024        # an accelerator
    python -m benchmarks.step_speed --settings=ensemble10,ensemble100,cifar_ensemble10 \
        --lowering=vmap
    python -m benchmarks.step_speed --settings=mnist5k,ensemble --generators=2 --batch=8 \
        --width=4 --rounds=1 --reps=1                      # a tiny check (tests/test_benchmarks.py)
    python -m benchmarks.step_speed --no_torch             # the project's columns only

PyTorch is optional (`pip install torch==2.13.0`, not a dependency of the package): without
it, or with --no_torch, only the project's columns are printed. Settings (--settings, comma
separated):
  mnist5k      DAFL's joint step (stages/dafl.py: generator + student update) at the mnist5k
               config's setting (configs/mnist5k.py:method=dafl): generator width 16, batch
               256, latent 100, LeNet-5 teacher, LeNet-5-half student. PyTorch: the authors'
               loop (benchmarks/torch_dafl.py AuthorsDAFL.step: one backward of
               generator loss + KD loss, both Adam steps), latents torch.randn each step.
  paper_mnist  the same at the paper's MNIST setting: width 128, batch 512.
  cifar10      DAFL's joint step at the CIFAR-10 setting (configs/cifar10.py:method=dafl):
               --teacher (ResNet-34) -> --student (ResNet-18), generator width 128, latent
               1000, batch --cifar_batch. PyTorch: the same transcription (its CIFAR branch: SGD
               student, step schedule); it has resnet18 and resnet34 only: for other models
               the PyTorch columns stay empty.
  ensembleN    one step of an ensemble of N per-class generators (stages/ensemble.py) at the
               mnist5k ensemble setting (configs/mnist5k.py:method=ensemble): Luo-style
               generators of width 16, 32 images each, LeNet-5-BN teacher, target-class CE +
               TV/l2 priors + BN moment matching; the lowering is the config's (its per-backend
               default, 'loop' on a CPU, 'vmap' elsewhere) or --lowering. PyTorch: N
               generators, one Adam each, updated in turn (benchmarks/torch_ensemble.py:
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
`ensemble.objective.member_loss` against the PyTorch reference's on the same weights, BN targets and
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
import gc
import os
import sys
import traceback

# JAX and PyTorch share a GPU: by default JAX would take 75% of its memory at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common, speed  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_SETTINGS = "mnist5k,paper_mnist,cifar10,ensemble10"


def header(argv, tctx, torch) -> list:
  """The heading with the command, then the machine line (and PyTorch's GPU settings)."""
  if torch is None:
    t = "torch not installed"
  else:
    t = f"torch {torch.__version__} ({torch.get_num_threads()} threads"
    t += f", device {tctx.device})" if tctx is not None else ", not used)"
  lines = [f"### python -m benchmarks.step_speed {' '.join(argv)}".rstrip(), "",
           common.machine_line(t)]
  if tctx is not None and tctx.device.type == "cuda":
    b = torch.backends
    lines.append(f"PyTorch GPU: {torch.cuda.get_device_name(tctx.device)}, cuDNN benchmark "
                 f"{b.cudnn.benchmark}, TF32 convolutions {b.cudnn.allow_tf32}, matmuls "
                 f"{b.cuda.matmul.allow_tf32}; JAX default matmul precision "
                 f"{jax.config.jax_default_matmul_precision or 'default'}")
  return lines


def table(rows: list, with_torch: bool) -> list:
  f = lambda x: "-" if x is None else f"{x:.3g}"
  cols = ["setting", "step", "project s/step", "project round medians", "project compile s"]
  if with_torch:
    cols += ["PyTorch s/step", "PyTorch round medians", "PyTorch first call s",
             "project / PyTorch"]
  cells = []
  for r in rows:
    j, t = r.jax, r.torch
    cells.append([r.setting, r.step, f(j.median()), j.spread(), f(j.first)])
    if with_torch:
      cells[-1] += (["-"] * 4 if t is None else
                    [f(t.median()), t.spread(), f(t.first), f"{j.median() / t.median():.2f}"])
  return common.markdown_table(cols, cells)


def torch_context(args, p):
  """(torch or None, speed.TorchCtx or None) of the arguments."""
  torch = None if args.no_torch else common.import_torch()
  if torch is None:
    return None, None
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  want = args.torch_device
  if want == "auto":
    want = "cuda" if torch.cuda.is_available() else "cpu"
  elif want == "cuda" and not torch.cuda.is_available():
    p.error("--torch_device=cuda, but PyTorch sees no CUDA device")
  if want == "cuda":
    torch.backends.cudnn.benchmark = True   # as XLA autotunes its convolutions
  torch.manual_seed(0)
  if want == "cpu":
    # XLA:CPU flushes denormals to zero; PyTorch does not by default, and the DAFL generator
    # (lr 0.2) drifts into denormal values that make PyTorch's CPU steps up to 10x slower.
    torch.set_flush_denormal(True)
  return torch, speed.TorchCtx(torch, torch.device(want))


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
    settings = speed.parse_settings(args.settings, args.generators)
  except ValueError as e:
    p.error(str(e))
  torch, tctx = torch_context(args, p)

  head = header(argv, tctx, torch)
  print("\n".join(head[2:]), flush=True)
  rows, notes, failures = [], [], []
  for kind, n in settings:
    name = kind if n is None else f"{kind}{n}"
    got: list = []
    try:
      got = speed.setting_rows(kind, n, args, tctx, notes, failures)
      for row in got:
        for timed in row.timed():
          timed.compile()
      common.time_rounds([row.timed() for row in got], args.rounds, args.reps, args.pause,
                         alternate=True, label=f"{name} ")
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
        for timed in row.timed():
          timed.release()
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
