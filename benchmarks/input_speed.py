"""Images/s of the streamed training input pipeline against its decode floor, on the same cores.

    python -m benchmarks.input_speed                      # 20,000 JPEGs in a temporary data dir
    python -m benchmarks.input_speed --images=4000 --data_dir=/tmp/synthetic_tfds --cores=2

Builds synthetic_imagenet (ImageNet-shaped JPEGs, sides 200..500 px; `python -m
datafree_jax.main make-jpeg-dataset`) in a temporary data dir, or reuses the build in
--data_dir, then measures the two pipelines in turn, in --rounds rounds of --seconds each;
each round of each pipeline starts after --warmup untimed batches (what it buffered while the
other ran), and images/s is the timed images over the timed seconds of all rounds:

  (a) the decode floor: a minimal tf.data pipeline over the train split's record files: read,
      parse the JPEG bytes, `tf.image.decode_and_crop_jpeg` inside a random crop window (the
      project's Inception-crop ranges, `tf.image.sample_distorted_bounding_box`), resize to
      --image_size (bilinear with antialiasing, as the project), random flip, batch, prefetch;
      nothing else;
  (b) the project's training pipeline end to end to host numpy arrays:
      `streaming.train_batches(...)(step)` for consecutive steps (its shuffle, per-epoch
      rebuilds, normalisation, host prefetch thread included).

Both pipelines use tf.data's AUTOTUNE parallelism on tf.data's default thread pool (one thread
per core the process may use: --cores pins the process to the first N cores before TensorFlow
starts). Prints images/s, images/s per core, images per CPU-second (the process's CPU time: the
cost of an image on one core, robust to other load on a shared machine) and (b)/(a), then the
host cores one accelerator host needs to feed its chips at a given images/s (from images per
CPU-second): the dry run's rate for the ImageNet teacher
(its hours: FLOPs per step / (dry_run_mfu x the chip's peak bfloat16 FLOP/s); with
--gflop_per_image, the teacher step's FLOPs per image, from the dry run's table) and a
published-throughput rate (--gpu_images_per_s per H100).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from benchmarks import common
from benchmarks import project

# The ImageNet teacher's train step (ResNet-50, 224 px, bfloat16): 3.06 TFLOP per GPU per call
# at 128 images per GPU, 1.53 TFLOP per TPU chip at 64 (the dry run, benchmarks/RESULTS.md,
# "The accelerator program, sized from a CPU", 2026-12-03): 23.9 GFLOP per image.
TEACHER_GFLOP_PER_IMAGE = 23.9
# Hosts fed: (label, device kind in the dry run's table, chips per host).
HOSTS = (("8 x H100 SXM", "H100 SXM", 8), ("TPU v5p host", "TPU v5p", 4))


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=20_000, help="training images to build")
  p.add_argument("--validation_images", type=int, default=500)
  p.add_argument("--min_side", type=int, default=200)
  p.add_argument("--max_side", type=int, default=500)
  p.add_argument("--data_dir", default="",
                 help="build into (or reuse the identical build in) this tfds data dir; "
                 "default: a temporary one, deleted afterwards")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch", type=int, default=256, help="images per batch (a local batch)")
  p.add_argument("--warmup", type=int, default=6,
                 help="untimed batches before each round of each pipeline")
  p.add_argument("--seconds", type=float, default=60.0, help="timed seconds per round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--cores", type=int, default=0,
                 help="pin the process to the first N cores it may use (0: all of them)")
  p.add_argument("--gflop_per_image", type=float, default=TEACHER_GFLOP_PER_IMAGE,
                 help="the teacher's train-step GFLOP per image (the dry run's)")
  p.add_argument("--mfu", type=float, default=0.0,
                 help="fraction of peak the dry run assumes (0: the config's dry_run_mfu)")
  p.add_argument("--gpu_images_per_s", type=float, default=3000.0,
                 help="published ResNet-50 training images/s per H100")
  args = p.parse_args(argv)
  for name in ("images", "validation_images", "image_size", "batch", "rounds"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be positive")
  if args.seconds <= 0 or args.warmup < 0 or args.cores < 0:
    p.error("--seconds must be positive, --warmup and --cores non-negative")
  if args.images < args.batch:
    p.error(f"--images ({args.images}) must hold at least one --batch ({args.batch})")
  return args


def pin_cores(n: int) -> int:
  """Pins this process to the first n cores it may use (0: leaves it); returns the count."""
  cores = sorted(os.sched_getaffinity(0))
  if n:
    if n > len(cores):
      raise SystemExit(f"error: --cores={n}, but this process may use {len(cores)} cores")
    cores = cores[:n]
    os.sched_setaffinity(0, cores)
  return len(cores)


def floor_batches(tf, files, batch: int, image_size: int, crop: dict, seed: int = 0):
  """(a): an endless iterator of host batches: read, decode_and_crop_jpeg in a random window,
  resize, flip; nothing else."""
  whole = tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32)

  def fn(record):
    data = tf.io.parse_single_example(
        record, {"image": tf.io.FixedLenFeature([], tf.string)})["image"]
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(data), bounding_boxes=whole,
        use_image_if_no_bounding_boxes=True, **crop)
    image = tf.image.decode_and_crop_jpeg(
        data, tf.stack([begin[0], begin[1], size[0], size[1]]), channels=3)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return tf.image.random_flip_left_right(image)

  tf.random.set_seed(seed)
  ds = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE).repeat()
  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()


class Pipeline:
  """A pipeline to time: next_batch() returns a host batch; rounds of images/s."""

  def __init__(self, name: str, next_batch, batch: int):
    self.name, self.next_batch, self.batch = name, next_batch, batch
    self.rates: list = []
    self.images, self.seconds, self.cpu_seconds = 0, 0.0, 0.0

  def warm(self, batches: int) -> float:
    """`batches` untimed batches; their seconds."""
    t = time.perf_counter()
    for _ in range(batches):
      self.next_batch()
    return time.perf_counter() - t

  def run(self, seconds: float, drain: int):
    """`drain` untimed batches (what the pipeline buffered while the other one ran), then
    batches for at least `seconds` (at least one): their images/s into rates."""
    self.warm(drain)
    count, t, cpu = 0, time.perf_counter(), time.process_time()
    while True:
      self.next_batch()
      count += 1
      elapsed = time.perf_counter() - t
      if elapsed >= seconds:
        break
    self.cpu_seconds += time.process_time() - cpu
    self.rates.append(count * self.batch / elapsed)
    self.images += count * self.batch
    self.seconds += elapsed

  def rate(self) -> float:
    """Images/s over every timed round together."""
    return self.images / self.seconds

  def per_cpu_second(self) -> float:
    """Images per second of this process's CPU time (all its threads) over the timed rounds."""
    return self.images / max(self.cpu_seconds, 1e-9)


def feeding_rows(per_core: dict, gflop_per_image: float, mfu: float, peak: dict,
                 gpu_images_per_s: float):
  """Rows: (host, images/s it consumes, the basis, host cores at each per-core rate)."""
  needs = []
  for label, kind, chips in HOSTS:
    per_chip = peak[kind] * mfu / (gflop_per_image * 1e9)
    needs.append((label, chips * per_chip,
                  f"dry run: {mfu:.0%} of {peak[kind] / 1e12:,.0f} TFLOP/s, "
                  f"{gflop_per_image:g} GFLOP/image: {per_chip:,.0f} images/s per chip"))
  needs.append(("8 x H100 SXM", 8 * gpu_images_per_s,
                f"published ResNet-50 training: {gpu_images_per_s:,.0f} images/s per GPU"))
  rows = []
  for label, rate, basis in needs:
    rows.append([label, f"{rate:,.0f}", basis] +
                [f"{rate / r:,.0f}" if r > 0 else "-" for r in per_core.values()])
  return rows


def main(argv=None) -> dict:
  """Runs the benchmark (argv: its flags; None: sys.argv's); returns report()'s figures."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  affinity = os.sched_getaffinity(0)
  try:
    return _run(args, pin_cores(args.cores), argv)
  finally:
    os.sched_setaffinity(0, affinity)


def _run(args, cores: int, argv) -> dict:
  command = "python -m benchmarks.input_speed " + " ".join(
      sys.argv[1:] if argv is None else argv)
  tmp = None
  data_dir = args.data_dir
  if not data_dir:
    tmp = data_dir = tempfile.mkdtemp(prefix="input_speed_tfds_")
  try:
    t = time.perf_counter()
    data = project.build_synthetic_imagenet(data_dir, args.images, args.validation_images,
                                            args.min_side, args.max_side)
    build_s = time.perf_counter() - t
    tf = project.import_tf()
    floor = floor_batches(tf, data["train_files"], args.batch, args.image_size,
                          project.crop_parameters())
    stream = project.streamed_train_batches(data_dir, args.batch, args.image_size)
    step = {"next": 0}

    def project_batch():
      batch = stream(step["next"])
      step["next"] += 1
      return batch

    pipelines = [Pipeline("(a) decode floor", lambda: next(floor), args.batch),
                 Pipeline("(b) project pipeline", project_batch, args.batch)]
    try:
      for p in pipelines:
        print(f"{p.name}: first {args.warmup} batches in {p.warm(args.warmup):.1f} s",
              flush=True)
      for r in range(args.rounds):
        for p in pipelines if r % 2 == 0 else pipelines[::-1]:
          p.run(args.seconds, args.warmup)
        print(f"round {r + 1}/{args.rounds}: " + "; ".join(
            f"{p.name} {p.rates[-1]:,.0f} images/s" for p in pipelines), flush=True)
    finally:
      stream.close()
    return report(args, cores, command, data, build_s, pipelines,
                  steps_per_epoch=stream.steps_per_epoch, steps=step["next"])
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)


def report(args, cores, command, data, build_s, pipelines, steps_per_epoch, steps) -> dict:
  """Prints the tables; returns {floor, project: images/s, ratio, cores}."""
  floor, proj = pipelines
  ratio = proj.rate() / floor.rate()
  print()
  print(common.machine_line())
  print(f"command: {command}")
  print(f"data: {data['train_examples']:,} training JPEGs, sides {args.min_side}..{args.max_side} "
        f"px, {data['mean_bytes'] / 1e3:.0f} kB each on average ({data['dir']}, built or "
        f"reused in {build_s:.0f} s); image size {args.image_size}, batch {args.batch}, "
        f"{cores} core(s); the project read {steps} steps ({steps_per_epoch} per epoch)")
  print()
  rows = []
  for p in pipelines:
    rows.append([p.name, f"{p.rate():,.0f}", f"{p.rate() / cores:,.0f}",
                 " - ".join(f"{x:,.0f}" for x in (min(p.rates), max(p.rates))),
                 f"{p.per_cpu_second():,.0f}", f"{p.rate() / floor.rate():.2f}",
                 f"{p.per_cpu_second() / floor.per_cpu_second():.2f}"])
  for line in common.markdown_table(
      ["pipeline", "images/s", "images/s per core", "rounds' range",
       "images per CPU-second", "vs (a), images/s", "vs (a), per CPU-second"], rows):
    print(line)
  cpu_ratio = proj.per_cpu_second() / floor.per_cpu_second()
  print(f"\nratio (b)/(a): {ratio:.2f} in images/s, {cpu_ratio:.2f} in images per CPU-second "
        f"(target >= 0.80). Images per CPU-second (the process's CPU time, all threads) is the "
        f"cost of an image on one core, whatever else the machine runs.")
  inputs = project.dry_run_rate_inputs()
  mfu = args.mfu or inputs["mfu"]
  per_core = {"(a)": floor.per_cpu_second(), "(b)": proj.per_cpu_second()}
  print("\nHost cores to feed an accelerator host at the ImageNet teacher's rate (images/s "
        "needed / images per CPU-second measured here; assumes the pipeline scales to that many "
        "cores):\n")
  for line in common.markdown_table(
      ["host", "images/s needed", "basis", "cores at (a)", "cores at (b)"],
      feeding_rows(per_core, args.gflop_per_image, mfu, inputs["peak"],
                   args.gpu_images_per_s)):
    print(line)
  return {"floor": floor.rate(), "project": proj.rate(), "ratio": ratio, "cores": cores,
          "floor_per_cpu_second": floor.per_cpu_second(),
          "project_per_cpu_second": proj.per_cpu_second(), "cpu_ratio": cpu_ratio}


if __name__ == "__main__":
  main()
