r"""ImageNet (tfds 'imagenet2012'): Luo et al.'s headline experiment, ResNet-50 teacher.

    python -m datafree_jax.main --config=configs/imagenet.py --config.data_dir=gs://BUCKET/tfds
    python -m datafree_jax.main --config=configs/imagenet.py:student=mobilenet_v2,dry_run=True

Published (Luo et al. 2020, ../shared/REFERENCE.md): ResNet-50 teacher 75.45% trained from
scratch; students from 1,000 per-class generators ResNet-50 69.75%, ResNet-18 54.66%,
MobileNetV2 43.15%. What it costs, from the dry run of the accelerator's program
(dry_run=True,target=tpu|gpu; benchmarks/RESULTS.md, "The accelerator program, sized from a
CPU"): per chip of a TPU v4-32 (16 chips) 9.4 GiB peak for the teacher's step, 20.9 GiB for the
generators' (64 per chip, 2 at a time), 5.8 GiB for distillation; per GPU of an 8x H100 host
18.5 / 36.1 / 11.2 GiB (126 generators each), and on paper, at 5% of peak, 1.9 / 2.7 / 2.2
hours. The full run is an accelerator job; on a CPU only the dry run and smoke=True run.

Arguments (`:k=v,k=v`):
  student   resnet18 (default) | resnet50 | mobilenet_v2
  method    ensemble (default) | dafl | kd_data | kd_noise | teacher
  seed      0
  stage     all | teacher | train | generators | distill
  dry_run   lower and compile every program of every stage from abstract inputs and print
            the sizing tables (memory per device kind, FLOPs, hours)
  target    the platform the dry run sizes: auto (the devices' own; tpu on a CPU) | tpu | gpu
  smoke     the same pipeline at toy size (32x32 images, tiny widths, generators for 4
            classes, a few steps of every stage) on a CPU, reading synthetic_imagenet:
            ImageNet-shaped JPEGs (1,000 classes) built locally without downloads:

    python -m datafree_jax.main make-jpeg-dataset --data_dir=/tmp/tfds
    python -m datafree_jax.main --config=configs/imagenet.py:smoke=True --config.data_dir=/tmp/tfds

Choices of this project (the paper does not publish them; each is a config field):
  - teacher recipe: the standard 90-epoch ResNet-50 one (SGD momentum 0.9, lr 0.1 x batch/256,
    weight decay 1e-4, cosine after a linear warmup of 5 epochs (Goyal et al.)), batch 1024,
    random-resized crops and flips;
  - generators: latent 512 and four upsampling blocks from 14x14 (the paper's latent and
    "extra upsampling layers"), width 128 (the authors' TF code), batch 32 per generator,
    Adam 1e-3, 5,000 steps; moment matching against 100 images per class (the paper's). The
    paper reports about 300 GPU-hours for this stage; the 5,000 steps here are a choice, and
    the dry run prints the hours they take on a given slice or host (2.7 h on 8 x H100 at 5%
    of peak, benchmarks/RESULTS.md);
  - distillation: batch 1024, SGD momentum 0.9, lr 0.4, cosine after 5 epochs of warmup,
    weight decay 1e-4, 150,000 steps (120 epochs' worth of images), temperature 1; student
    mobilenet_v2 takes torchvision's MobileNetV2 values instead (lr 0.045 per 256 images:
    0.18, weight decay 4e-5).
Computation is bfloat16 (parameters, optimiser state and BN statistics float32).
"""
from datafree_jax import config_lib
from datafree_jax import datasets

STUDENTS = {"resnet18": "resnet18_imagenet", "resnet50": "resnet50_imagenet",
            "mobilenet_v2": "mobilenet_v2"}
IMAGES = 1_281_167                      # imagenet2012's training split
WARMUP_STEPS = round(5 * IMAGES / 1024)  # 5 epochs at batch 1024 (Goyal et al.): 6,256


def get_config(arg=None):
  a = config_lib.parse_arg(arg, student="resnet18", method="ensemble", seed=0, stage="all",
                           dry_run=False, target="auto", smoke=False)
  config_lib.check_choice("student", a.student, tuple(STUDENTS))
  config_lib.check_choice("method", a.method,
                          ("ensemble", "dafl", "kd_data", "kd_noise", "teacher"))
  c = config_lib.base_config()
  c.dataset = "imagenet2012"
  c.method, c.seed, c.stage = a.method, a.seed, a.stage
  c.dry_run = a.dry_run
  c.dry_run_target = a.target
  c.dtype = "bfloat16"
  c.checkpoint_every = 2000

  c.teacher.model = "resnet50_imagenet"
  c.teacher.batch_size = 1024
  c.teacher.steps = 112600          # 90 epochs of 1,281,167 images at batch 1024
  c.teacher.optimizer = "sgd"
  c.teacher.lr = 0.4
  c.teacher.momentum = 0.9
  c.teacher.weight_decay = 1e-4
  c.teacher.schedule = "cosine"
  c.teacher.warmup_steps = WARMUP_STEPS
  c.teacher.eval_every = 5000
  c.teacher.bn_stats_per_class = 100

  c.student.model = STUDENTS[a.student]
  c.student.batch_size = 1024
  c.student.steps = 150000
  c.student.optimizer = "sgd"
  c.student.lr = 0.4
  c.student.momentum = 0.9
  c.student.weight_decay = 1e-4
  c.student.schedule = "cosine"
  c.student.warmup_steps = WARMUP_STEPS
  c.student.eval_every = 5000
  if a.student == "mobilenet_v2":
    # torchvision's MobileNetV2 recipe: lr 0.045 per 256 images, weight decay 4e-5 (its x0.98
    # per epoch decay over 300 epochs replaced by the cosine of this budget).
    c.student.lr = 0.045 * c.student.batch_size / 256
    c.student.weight_decay = 4e-5

  c.generator.latent_dim = 512
  c.generator.width = 128
  c.generator.num_upsample = 4      # 14x14 -> 224x224
  c.generator.lr = 0.02             # method=dafl: the paper's CIFAR settings for BN teachers
  c.generator.w_oh, c.generator.w_a, c.generator.w_ie = 0.05, 0.01, 5.0

  e = c.ensemble
  e.num_generators = 0              # one per class: 1,000
  e.batch_per_generator = 32
  e.steps = 5000
  e.lr = 1e-3
  e.w_mm = 1.0
  e.eval_every = 1000
  e.max_generators_per_device_at_once = 2   # fits 8 x H100 (80 GB) and a TPU v4-32 slice

  if a.smoke:
    _smoke(c)
  return c


def _smoke(c):
  """Toy size: every stage a few steps on 32x32 images, tiny widths, generators for the first
  4 of the 1,000 classes, on the locally built synthetic_imagenet (its data dir:
  --config.data_dir, else $TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  c.dataset = datasets.SYNTHETIC_IMAGENET
  c.image_size = 32
  c.checkpoint_every = 0
  c.teacher.width = 8
  c.teacher.batch_size = 16
  c.teacher.steps = 4
  c.teacher.lr = 0.005              # the full recipe's lr is for batch 1024
  c.teacher.warmup_steps = c.student.warmup_steps = 0
  c.teacher.eval_every = 0
  c.teacher.bn_stats_per_class = 4
  c.student.width = 8
  c.student.batch_size = 16
  c.student.steps = 4
  c.student.lr = 0.005
  c.student.eval_every = 0
  c.generator.latent_dim = 16
  c.generator.width = 8
  c.generator.num_upsample = 2      # 8x8 -> 32x32
  c.ensemble.num_generators = 4
  c.ensemble.batch_per_generator = 4
  c.ensemble.steps = 3
  c.ensemble.eval_every = 0
  c.ensemble.max_generators_per_device_at_once = 0
