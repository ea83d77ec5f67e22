"""Teachers from files of other projects: PyTorch state_dicts and Flax variable trees.

`teacher.init_from=PATH` (stages/teacher.py) takes, besides a teacher checkpoint of this
project:

  * a PyTorch state_dict: `.pt` / `.pth` / `.bin` (read with torch, `weights_only=True`) or
    `.safetensors` (read with the `safetensors` package's numpy loader; no torch needed);
  * a Flax variable tree: a `.msgpack` file (`flax.serialization.to_bytes` / `msgpack_serialize`
    of {'params': ..., 'batch_stats': ...}, of a state holding those two, e.g. a TrainState,
    or of the params alone) or an orbax PyTree checkpoint directory (a checkpoint itself, a
    step directory holding one item, or a CheckpointManager directory: its latest step).

Pure functions:

    read_state_dict(path) -> {key: np.ndarray}            # PyTorch names and layout
    to_flax(model_name, state_dict, target) -> variables   # renamed, transposed, checked
    read_flax(path, target) -> variables                   # checked against target

`target` is the model's {'params', 'batch_stats'} (arrays or jax.ShapeDtypeStructs, e.g.
jax.eval_shape of the model's init); the result has its structure, float32 NumPy leaves. Any
mismatch raises TeacherError naming the first missing, unexpected or mis-shaped key.

PyTorch names, by teacher.model:
  * resnet18_imagenet, resnet34_imagenet, resnet50_imagenet, mobilenet_v2: torchvision's
    (`models.imagenet.torchvision_key`: `conv1.weight`, `layer1.0.downsample.1.running_var`,
    `features.1.conv.0.0.weight`, `classifier.1.weight`, ...).
  * resnet18, resnet34 (CIFAR ResNets): the DAFL authors' resnet.py (huawei-noah/
    Data-Efficient-Model-Compression, DAFL/resnet.py): `conv1`, `bn1`, `layer{1-4}.{j}.conv1`,
    `.bn1`, `.conv2`, `.bn2`, `.shortcut.0` (1x1 conv), `.shortcut.1` (its BN), `linear`.
    Their avg_pool2d(out, 4) is the global average pool of this project's ResNet on 32x32
    inputs (the size their code is for).
  * lenet5, lenet5_half: the DAFL authors' lenet.py (`LeNet5`, `LeNet5Half`): `conv1`, `conv2`,
    `conv3`, `fc1`, `fc2` (their relu/maxpool modules have no parameters).
    lenet5_bn, lenet5_half_bn (not in the authors' code): the same names plus `bn1`, `bn2`,
    `bn3`, the BatchNorm2d after each conv.
  * hinton, hinton_half (not in the authors' code): `fc1`, `fc2`, `head`, the first layer's
    input being the image flattened in NHWC order (the same as PyTorch's NCHW order for
    1-channel images only).
  * wrn16_1, wrn16_2, wrn40_1, wrn40_2, vgg8_bn, vgg11_bn, vgg13_bn: zju-vipa/DataFree's
    (datafree/models/classifiers/wresnet.py, vgg.py; models.cifar_zoo): `conv1`,
    `block{1-3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}`, `bn1`, `fc`; `block{0-4}.{j}`
    (conv 3i, BN 3i + 1), `classifier`. Their resnet18 / resnet34 have the DAFL authors' names
    (above). Their zoo's files (`checkpoints/pretrained/cifar10_wrn40_2.pth`, ...) wrap the
    state_dict with 'epoch', 'arch', 'optimizer', ... under 'state_dict' (unwrapped below).
Leaves: weight / bias of convs, linears and BNs, BN running_mean / running_var;
`num_batches_tracked` is ignored, and a `module.` prefix on every key (nn.DataParallel) is
dropped. Conv weights go from OIHW to HWIO, linear ones from (out, in) to (in, out); LeNet-5's
fc1 also has its input reordered from PyTorch's NCHW flattening to this project's NHWC one
(the identity on 32x32 inputs, where conv3's output is 1x1).

When a state_dict does not fit teacher.model, the error names the first missing, unexpected or
mis-shaped key and, where the file's keys are those of another supported model (`identify`:
the same names, and the same shapes but for the input convolution and the classifier), that
model: "... (its keys are those of teacher.model='wrn40_2')".
"""
from __future__ import annotations

import functools
import io
import json
import os
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from datafree_jax.errors import TeacherError
from datafree_jax.models import classifiers, imagenet

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
MSGPACK_SUFFIX = ".msgpack"
STATE_DICT_SUFFIXES = TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)

# Our leaf names -> PyTorch's, per variable collection (torchvision's = DAFL's).
_LEAF_NAMES = {"params": {"kernel": "weight", "scale": "weight", "bias": "bias"},
               "batch_stats": {"mean": "running_mean", "var": "running_var"}}
_IGNORED_SUFFIXES = ("num_batches_tracked",)
# Keys under which training scripts commonly wrap the state_dict in the file they save.
_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "teacher")


# ---------------------------------------------------------------------------------------------
# Reading files.


def read_state_dict(path) -> dict:
  """{key: float32/int NumPy array} of the PyTorch state_dict in `path`.

  `.safetensors` is read with the `safetensors` package (no torch); `.pt`, `.pth` and `.bin`
  with torch.load(weights_only=True) (a pickled nn.Module is refused: save its state_dict).
  A dict that wraps the state_dict (under 'state_dict', 'model_state_dict', 'model', 'net' or
  'teacher', beside e.g. 'epoch') is unwrapped.
  """
  p = epath.Path(path)
  if not p.is_file():
    raise TeacherError(f"{path}: no such file")
  suffix = p.suffix.lower()
  if suffix == SAFETENSORS_SUFFIX:
    return _read_safetensors(p)
  if suffix in TORCH_SUFFIXES:
    return _read_torch(p)
  raise TeacherError(f"{path}: a state_dict file must end in "
                     f"{', '.join(STATE_DICT_SUFFIXES)}, got {suffix or 'no suffix'!r}")


def _read_safetensors(p: epath.Path) -> dict:
  try:
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise TeacherError(f"reading {p} needs the safetensors package: pip install safetensors "
                       "(torch is not needed)") from e
  data = p.read_bytes()
  try:
    return dict(safetensors.numpy.load(data))
  except Exception:  # pylint: disable=broad-except
    # E.g. bfloat16, which the numpy loader does not know: the format read directly.
    return _parse_safetensors(data, p)


# safetensors dtype names -> NumPy dtypes (bfloat16 through ml_dtypes, which jax depends on).
def _safetensors_dtype(name: str):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}[name]


def _parse_safetensors(data: bytes, p) -> dict:
  """The safetensors format read directly: u64 header size, JSON header, raw little-endian
  data (for dtypes the package's numpy loader refuses)."""
  try:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    out = {}
    for key, entry in header.items():
      if key == "__metadata__":
        continue
      begin, end = entry["data_offsets"]
      dtype = np.dtype(_safetensors_dtype(entry["dtype"])).newbyteorder("<")
      out[key] = np.frombuffer(data[8 + n + begin:8 + n + end], dtype).reshape(entry["shape"])
    return out
  except Exception as e:  # pylint: disable=broad-except
    raise TeacherError(f"{p} is not a readable safetensors file ({type(e).__name__}: "
                       f"{_first_line(e)})") from e


def _read_torch(p: epath.Path) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise TeacherError(
        f"reading {p} needs PyTorch: pip install torch (the CPU build is enough), or save the "
        "state_dict as .safetensors (safetensors.torch.save_file), which needs only "
        "pip install safetensors") from e
  try:
    if _is_local(p):
      obj = torch.load(os.fspath(p), map_location="cpu", weights_only=True)
    else:
      obj = torch.load(io.BytesIO(p.read_bytes()), map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise TeacherError(
        f"{p} could not be read with torch.load(weights_only=True) ({type(e).__name__}: "
        f"{_first_line(e)}); save the model's state_dict (torch.save(model.state_dict(), "
        "path)), not the model itself") from e
  obj = _unwrap(obj, p)
  out = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise TeacherError(f"{p} is not a state_dict: {key!r} holds a {type(value).__name__}, "
                         "not a tensor")
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
      value = value.float()  # float16 / bfloat16: NumPy (bfloat16) or precision
    out[key] = value.numpy()
  return out


def _unwrap(obj, p) -> Mapping:
  if not isinstance(obj, Mapping):
    raise TeacherError(f"{p} holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
  for name in _WRAPPERS:
    if isinstance(obj.get(name), Mapping) and not _holds_arrays(obj):
      return _unwrap(obj[name], p)
  return obj


def _holds_arrays(obj: Mapping) -> bool:
  return bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def _is_local(p: epath.Path) -> bool:
  return "://" not in os.fspath(p)


def _first_line(e: Exception) -> str:
  return str(e).splitlines()[0] if str(e) else ""


# ---------------------------------------------------------------------------------------------
# PyTorch names and layout -> this project's variables.


def _dafl_resnet_module(name: str) -> str:
  """A module of our CIFAR ResNet (classifiers.ResNet) -> the DAFL authors' resnet.py name."""
  fixed = {"stem_conv": "conv1", "stem_bn": "bn1", "head": "linear",
           "shortcut_conv": "shortcut.0", "shortcut_bn": "shortcut.1"}
  if name in fixed:
    return fixed[name]
  if name.startswith("stage") and "_block" in name:  # stage{i}_block{j} -> layer{i}.{j - 1}
    stage, block = name[len("stage"):].split("_block")
    return f"layer{stage}.{int(block) - 1}"
  return name  # conv1, bn1, conv2, bn2 inside a block


def _same_module(name: str) -> str:
  return name


def _zoo_module(name: str) -> str:
  """A module of models.cifar_zoo -> zju-vipa/DataFree's name: '_' is their '.'."""
  return name.replace("_", ".")


# zju-vipa/DataFree's CIFAR models that the DAFL authors' code lacks (models/cifar_zoo.py).
ZOO_MODELS = ("wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2", "vgg8_bn", "vgg11_bn", "vgg13_bn")


# teacher.model -> our module name -> PyTorch module name (per path element, joined by ".").
_MODULE_NAMES: dict = {
    "resnet18": _dafl_resnet_module, "resnet34": _dafl_resnet_module,
    "lenet5": _same_module, "lenet5_half": _same_module, "lenet5_bn": _same_module,
    "lenet5_half_bn": _same_module, "hinton": _same_module, "hinton_half": _same_module,
    **{name: _zoo_module for name in ZOO_MODELS},
}
_TORCHVISION = ("resnet18_imagenet", "resnet34_imagenet", "resnet50_imagenet", "mobilenet_v2")
# Models whose first dense layer follows conv features: (dense module, conv module before it).
_FLATTEN_AFTER_CONV = {"lenet5": ("fc1", "conv3"), "lenet5_half": ("fc1", "conv3"),
                       "lenet5_bn": ("fc1", "conv3"), "lenet5_half_bn": ("fc1", "conv3")}

SUPPORTED_MODELS = tuple(sorted(_TORCHVISION + tuple(_MODULE_NAMES)))


def torch_key(model_name: str, collection: str, path: Sequence[str]) -> str:
  """The PyTorch state_dict key of variables[collection][path...] of teacher.model
  `model_name` (names in the module docstring)."""
  if model_name in _TORCHVISION:
    return imagenet.torchvision_key(collection, path)
  if model_name not in _MODULE_NAMES:
    raise TeacherError(f"no PyTorch names are known for teacher.model={model_name!r}; "
                       f"state_dicts can be imported for {', '.join(SUPPORTED_MODELS)} (a Flax "
                       "msgpack file or orbax checkpoint works for every model)")
  if collection not in _LEAF_NAMES or path[-1] not in _LEAF_NAMES[collection]:
    raise TeacherError(f"no PyTorch counterpart for {collection}/{'/'.join(path)}")
  rename = _MODULE_NAMES[model_name]
  return ".".join([rename(m) for m in path[:-1]] + [_LEAF_NAMES[collection][path[-1]]])


def _torch_shape(shape: Sequence[int]) -> tuple:
  """Our leaf shape in PyTorch's layout: HWIO -> OIHW, (in, out) -> (out, in)."""
  shape = tuple(shape)
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape[::-1] if len(shape) == 2 else shape


def _nchw_to_nhwc_rows(kernel: np.ndarray, channels: int) -> np.ndarray:
  """Reorders the input rows of an (in, out) dense kernel whose input is a flattened (C, H, W)
  feature map (PyTorch's order) into the order of a flattened (H, W, C) one (ours). Only
  H * W = in / C matters, not H and W themselves."""
  n_in, n_out = kernel.shape
  hw = n_in // channels
  return kernel.reshape(channels, hw, n_out).transpose(1, 0, 2).reshape(n_in, n_out)


def to_flax(model_name: str, state_dict: Mapping, target_variables: Mapping) -> dict:
  """{'params', 'batch_stats'} of teacher.model `model_name` in the structure of
  `target_variables`, from a PyTorch state_dict (read_state_dict's, or tensors: anything
  np.asarray takes) under the names of the module docstring. Raises TeacherError on the first
  missing, unexpected or mis-shaped key."""
  state = _clean(state_dict)
  leaves = _target_leaves(target_variables)
  keyed = [(torch_key(model_name, c, path), c, path, leaf) for c, path, leaf in leaves]
  flatten = _FLATTEN_AFTER_CONV.get(model_name)
  conv_channels = None
  if flatten:  # the channels of the conv whose flattened output the dense layer reads
    conv_channels = next((leaf.shape[-1] for c, path, leaf in leaves
                          if c == "params" and path == (flatten[1], "kernel")), None)

  def convert(key, collection, path, value):
    value = np.asarray(value)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
      value = value.T
      if flatten and path == (flatten[0], "kernel") and conv_channels:
        value = _nchw_to_nhwc_rows(value, conv_channels)
    return value

  try:
    return _assemble(keyed, state, convert, describe=_torch_shape,
                     what=f"state_dict (PyTorch names of {model_name!r})")
  except TeacherError as e:
    raise TeacherError(f"{e}{_other_model_hint(model_name, state)}") from None


def _clean(state_dict: Mapping) -> dict:
  """state_dict without num_batches_tracked and without nn.DataParallel's 'module.' prefix."""
  state = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


@functools.lru_cache(maxsize=None)
def _layout(model_name: str) -> tuple:
  """((PyTorch key, shape in PyTorch's layout), ...) of `model_name` at its standard width,
  for 10 classes of 32x32 images (3 channels; 1 for the LeNets and MLPs). Traced abstractly."""
  channels = 1 if model_name.startswith(("lenet", "hinton")) else 3
  model = classifiers.get_classifier(model_name, 10)
  x = jax.ShapeDtypeStruct((1, 32, 32, channels), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return tuple((torch_key(model_name, c, path), _torch_shape(leaf.shape))
               for c, path, leaf in _target_leaves(variables))


def _marks(model_name: str) -> tuple:
  """Keys that every state_dict of `model_name`'s family has (identify traces only the models
  whose marks a file has: tracing all of them takes seconds)."""
  if model_name == "mobilenet_v2":
    return ("features.0.0.weight",)
  if model_name in _TORCHVISION:
    return ("fc.weight", "layer1.0.conv1.weight")
  prefixes = {"wrn": "block1.layer.0.conv1.weight", "vgg": "block0.0.weight",
              "resnet": "linear.weight", "lenet": "conv3.weight", "hinton": "head.weight"}
  return tuple(k for p, k in prefixes.items() if model_name.startswith(p))


def identify(state_dict: Mapping) -> tuple:
  """(models, named): the teacher.model names (SUPPORTED_MODELS) whose PyTorch keys are the
  keys of `state_dict` (num_batches_tracked and a 'module.' prefix ignored) with the same
  shapes at the standard width, but for at most three arrays (the input convolution's kernel,
  which depends on the image channels, and the classifier's weight and bias, which depend on
  the classes); and those with the same key names whatever the shapes."""
  state = _clean(state_dict)
  models, named = [], []
  for name in SUPPORTED_MODELS:
    if not all(k in state for k in _marks(name)):
      continue  # not traced: its family's keys are not in the file
    layout = _layout(name)
    if {k for k, _ in layout} != set(state):
      continue
    named.append(name)
    if sum(tuple(np.shape(state[k])) != shape for k, shape in layout) <= 3:
      models.append(name)
  return models, named


def _other_model_hint(model_name: str, state: Mapping) -> str:
  """'; its keys are those of teacher.model=...' when a state_dict that does not fit
  `model_name` has another supported model's keys (identify); else ''."""
  models, named = identify(state)
  which = lambda names: " or ".join(f"teacher.model={n!r}" for n in names)
  if models and model_name not in models:
    return f"; its keys are those of {which(models)}"
  if named and model_name not in named:
    return f"; its key names are those of {which(named)} (at another width)"
  return ""


def to_state_dict(model_name: str, variables: Mapping) -> dict:
  """to_flax's inverse: {PyTorch key: NumPy array in PyTorch's layout} of `variables`' params
  and batch_stats (e.g. to save a teacher for PyTorch, or a test file without torch)."""
  leaves = _target_leaves(variables)
  flatten = _FLATTEN_AFTER_CONV.get(model_name)
  out = {}
  for c, path, leaf in leaves:
    value = np.asarray(leaf)
    if value.ndim == 2 and flatten and path == (flatten[0], "kernel"):
      channels = next(l.shape[-1] for c2, p2, l in leaves
                      if c2 == "params" and p2 == (flatten[1], "kernel"))
      n_in, n_out = value.shape  # NHWC rows -> NCHW rows
      value = value.reshape(n_in // channels, channels, n_out).transpose(1, 0, 2).reshape(
          n_in, n_out)
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:
      value = value.T
    out[torch_key(model_name, c, path)] = np.ascontiguousarray(value)
  return out


def read_flax(path, target) -> dict:
  """{'params', 'batch_stats'} in the structure of `target` from a Flax msgpack file or an orbax
  PyTree checkpoint directory (module docstring). The tree may be {'params', 'batch_stats'},
  a state holding them (its other entries, e.g. 'step' or 'opt_state', are ignored) or the
  params alone (for a model without BatchNorm). Raises TeacherError on the first missing,
  unexpected or mis-shaped entry."""
  p = epath.Path(path)
  if p.is_dir():
    tree = _read_orbax(p)
  elif p.is_file():
    import flax.serialization  # pylint: disable=g-import-not-at-top
    try:
      tree = flax.serialization.msgpack_restore(p.read_bytes())
    except Exception as e:  # pylint: disable=broad-except
      raise TeacherError(f"{p} is not a Flax msgpack file (flax.serialization.to_bytes) "
                         f"({type(e).__name__}: {_first_line(e)})") from e
  else:
    raise TeacherError(f"{path}: no such file or directory")
  return flax_variables(tree, target, source=str(p))


def flax_variables(tree, target, source: str = "the tree") -> dict:
  """read_flax's checks and selection on a tree already in memory (nested dicts of arrays)."""
  if not isinstance(tree, Mapping):
    raise TeacherError(f"{source} holds a {type(tree).__name__}, not a dict of variables")
  if "params" in tree:
    variables = {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}}
    alone = False
  else:
    variables, alone = {"params": tree, "batch_stats": {}}, True
  flat = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    flat["/".join(_key_name(k) for k in keys)] = leaf
  leaves = _target_leaves(target)
  keyed = [("/".join((c,) + path), c, path, leaf) for c, path, leaf in leaves]
  hint = ""
  if alone and any(c == "batch_stats" for c, _, _ in leaves):
    hint = (" (it holds the params alone, but this model has BatchNorm layers: save "
            "{'params': ..., 'batch_stats': ...})")
  return _assemble(keyed, flat, lambda key, c, path, value: np.asarray(value),
                   describe=tuple, what=f"Flax variables{hint}")


def _read_orbax(p: epath.Path):
  """The tree of the orbax PyTree checkpoint at `p` (the checkpoint, a step directory with one
  item, or a CheckpointManager directory), as NumPy arrays; of a tree with 'params' only its
  'params' and 'batch_stats' are read."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt = _find_pytree_checkpoint(p)
  if ckpt is None:
    raise TeacherError(
        f"no checkpoint in {p}: neither a teacher stage directory or workdir of this project "
        "nor an orbax PyTree checkpoint (a directory with _METADATA), a step directory holding "
        "one, or a CheckpointManager directory of numbered steps")
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      meta = checkpointer.metadata(ckpt)
      meta = getattr(meta, "item_metadata", meta)
      meta = getattr(meta, "tree", meta)
      if isinstance(meta, Mapping) and "params" in meta:
        meta = {k: meta[k] for k in ("params", "batch_stats") if k in meta}
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
      return checkpointer.restore(ckpt, args=ocp.args.PyTreeRestore(
          item=meta, restore_args=restore_args, partial_restore=True))
  except TeacherError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise TeacherError(f"cannot read the orbax checkpoint {ckpt} ({type(e).__name__}: "
                       f"{_first_line(e)})") from e


def is_pytree_checkpoint(p: epath.Path) -> bool:
  return p.is_dir() and ((p / "_METADATA").exists() or (p / "manifest.ocdbt").exists() or
                         (p / "checkpoint").exists())


def _find_pytree_checkpoint(p: epath.Path) -> Optional[epath.Path]:
  if is_pytree_checkpoint(p):
    return p
  children = [c for c in p.iterdir() if c.is_dir()]
  steps = [c for c in children if c.name.isdigit()]
  if steps:  # a CheckpointManager directory: its latest step
    return _find_pytree_checkpoint(max(steps, key=lambda c: int(c.name)))
  items = [c for c in children if is_pytree_checkpoint(c)]
  if len(items) == 1:
    return items[0]
  for name in ("default", "state", "params", "model"):
    if (p / name) in items:
      return p / name
  return None


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


# ---------------------------------------------------------------------------------------------
# Shared: the target's leaves, checks and assembly.


def _target_leaves(target: Mapping) -> list:
  """[(collection, path, leaf)] of target's 'params' and 'batch_stats'."""
  out = []
  for collection in ("params", "batch_stats"):
    flat = jax.tree_util.tree_flatten_with_path(dict(target.get(collection) or {}))[0]
    out += [(collection, tuple(_key_name(k) for k in keys), leaf) for keys, leaf in flat]
  return out


def _assemble(keyed: list, source: Mapping, convert: Callable, describe: Callable,
              what: str) -> dict:
  """Nested {'params', 'batch_stats'} from source[key] of every (key, collection, path, leaf)
  of `keyed`, converted, checked against leaf.shape; TeacherError names the first missing,
  unexpected or mis-shaped key (shapes in the source's layout, `describe`)."""
  wanted = {key for key, *_ in keyed}
  missing = [(key, c, path, leaf) for key, c, path, leaf in keyed if key not in source]
  unexpected = sorted(k for k in source if k not in wanted)
  out: dict = {"params": {}, "batch_stats": {}}
  misshaped = []
  for key, c, path, leaf in keyed:
    if key not in source:
      continue
    value = source[key]
    if tuple(np.shape(value)) != describe(leaf.shape):
      misshaped.append((key, tuple(np.shape(value)), describe(leaf.shape)))
      continue
    value = convert(key, c, path, value)
    node = out[c]
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.asarray(value, dtype=np.dtype(getattr(leaf, "dtype", np.float32)))
  counts = (f" ({len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} "
            "mis-shaped keys in all)")
  if missing:
    key, c, path, leaf = missing[0]
    raise TeacherError(f"{what}: missing key {key!r} (for {c}/{'/'.join(path)}, shape "
                       f"{describe(leaf.shape)}){counts}")
  if unexpected:
    raise TeacherError(f"{what}: unexpected key {unexpected[0]!r} (shape "
                       f"{tuple(np.shape(source[unexpected[0]]))}), which this model has no "
                       f"variable for{counts}")
  if misshaped:
    key, got, expected = misshaped[0]
    raise TeacherError(f"{what}: key {key!r} has shape {got}, expected {expected}{counts}")
  return out
