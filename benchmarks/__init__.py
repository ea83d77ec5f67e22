"""Benchmarks of this project: each entry runs from the repository root as
`python -m benchmarks.NAME` (`--help` for its arguments).

Entries:
  step_speed             s/step of each step beside its PyTorch reference (accelerator.sh runs it
                         at accelerator sizes)
  dafl_step_speed        s/step of the DAFL step (mnist5k and paper sizes), the project's only
  ensemble_step_speed    the ensemble step's lowerings side by side
  mnist5k_table          the accuracy tables of the README's Results (seeds, methods, wall time)
  methods_table          every method on mnist5k on one wall-clock budget: final accuracy over
                         seeds, time to 90% and 95%
  dafl_torch_reference   the mnist5k DAFL parity with the authors' loop: step agreement, accuracy
  dafl_cifar_torch_check the CIFAR-10 DAFL step against the authors' code, with tolerances
  imagenet_sizing        the ImageNet dry runs for each student and device count
  input_speed            images/s of the streamed training input against its decode floor, on a
                         locally built ImageNet-shaped JPEG dataset; host cores per accelerator host
  accelerator_methods    accelerator.sh step 5's tables: every method's CIFAR-10 programs (measured
                         s/call, hours of the published schedule) and its time-limited runs
  save_speed             checkpoint save times: local disk and a GCS emulator, async on and off
Shared modules:
  common         timing, markdown tables, the machine's description, statistics
  project        the one module that imports the datafree_jax package
  torch_dafl     the PyTorch transcription of the authors' DAFL (models, losses, loop) and the
                 Flax <-> PyTorch weight conversion
  torch_ensemble the PyTorch reference of the generator-ensemble step
  dafl_compare   the project's DAFL step against torch_dafl's from the same weights
  speed          the steps the speed entries time
"""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
