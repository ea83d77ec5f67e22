"""DAFL at the paper's CIFAR-10 setting: this project's JAX step against the authors' PyTorch code.

    pip install torch==2.13.0        # the reference only: not a dependency of the package
    python -m benchmarks.dafl_cifar_torch_check [--batch=8] [--steps=3] [--schedule_steps=5]

The setting is configs/cifar10.py with method=dafl (ResNet-34 teacher, ResNet-18 student,
generator of latent size 1000 and width 128, w_oh 0.05 / w_ie 5 / w_a 0.01, Adam lr 0.02 for
the generator, SGD lr 0.1 momentum 0.9 weight decay 5e-4 with the x0.1 / x0.01 step schedule
for the student) at a small batch. The PyTorch side is torch_dafl, the transcription of the
authors' release (huawei-noah/Efficient-Computing, Data-Efficient-Model-Compression/DAFL): the
Generator class, kdloss and the CIFAR training loop of DAFL-train.py, and resnet.py's CIFAR
ResNets. The comparisons are dafl_compare's. The teacher
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
  the stage's building blocks `dafl.generator_dafl_loss` and `students.student_kd_loss`; PyTorch:
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
import sys

try:
  import torch  # pylint: disable=g-import-not-at-top
except ImportError:
  sys.exit("this benchmark needs PyTorch: pip install torch==2.13.0")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import dafl_compare, torch_dafl  # pylint: disable=g-import-not-at-top,wrong-import-position


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
  setting = dafl_compare.cifar_setting(args.batch, args.schedule_steps, args.seed)
  rows = dafl_compare.check_rows(setting, args.steps, args.per_leaf, args.divergence)
  c = setting.config
  lrs = [torch_dafl.student_lr(c.student, i) for i in range(args.steps)]
  print(f"CIFAR-10 DAFL (configs/cifar10.py, method dafl), batch {args.batch}, seed {args.seed}: "
        f"teacher {c.teacher.model} (random, eval mode), student {c.student.model}, latent "
        f"{c.generator.latent_dim}, generator width {c.generator.width}; student lr per step "
        f"{lrs}; jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}"
        "\n")
  print(dafl_compare.format_table(rows))
  print()
  print(NOTES)
  failed = [r["quantity"] for r in rows if r["ok"] is False]
  print(f"\n{len(rows) - len(failed)} of {len(rows)} rows pass or are information only"
        + (f"; FAILED: {failed}" if failed else ""))
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
