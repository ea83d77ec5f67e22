"""The frozen generators the distillation stage draws from: loaded from a generator checkpoint
(on any device count, replicated or split over the devices), and the jitted draw of a step's
images, each generator in its training BN batch (make_images_fn)."""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import generator_parts
from datafree_jax import models
from datafree_jax import parallel
from datafree_jax import paths
from datafree_jax import platforms
from datafree_jax.ensemble import members as members_lib
from datafree_jax.ensemble import objective


def distill_layout(setting: str, g: int, devices: int) -> str:
  """config.ensemble.distill_layout resolved: 'sharded' or 'replicated'."""
  if setting != "auto":
    return setting
  return "sharded" if g >= devices else "replicated"


def load_generators(path: str, info, mesh: Optional[Mesh] = None, dtype=None,
                    layout: str = "replicated", platform: Optional[str] = None) -> dict:
  """The finished generators in `path` on `mesh`, checked against `info`; their module computes
  in `dtype`, in the form of `platform` (platforms.py). layout 'replicated': every device holds
  all G; 'sharded': the stacked members are split over the mesh's axis, padded with zero members
  to a multiple of its size (each device reads only its part); 'auto': distill_layout's
  choice.

  Works on any device count: the restore target is built from the checkpoint's own meta and
  item shapes. Reads only the final checkpoint's 'generators' item (its 'resume' item, the
  optimiser state, may have been deleted; checkpoints.py). Returns {'gen', 'params', 'batch_stats' (stacked, leading axis G, or the padded
  count when sharded), 'meta', 'directory', 'layout', 'padded'}.

  Raises:
    CheckpointError: no finished generator checkpoint in `path`, or one made for other images
      or another number of classes.
  """
  d = ckpt_lib.stage_directory(path, "generators")
  hint = ("run the generators stage first (stage=generators or stage=all), or point "
          "generator_checkpoint at a generators directory")
  if not paths.isdir(d):
    raise ckpt_lib.CheckpointError(f"no generator checkpoint in {d}; {hint}")
  ckpt = ckpt_lib.StageCheckpoints(d, create=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ckpt_lib.CheckpointError(f"no generator checkpoint in {d}; {hint}")
    meta = ckpt.restore_meta(step)
    if meta.get("kind") != "generator_ensemble":
      raise ckpt_lib.CheckpointError(f"the checkpoint in {d} is not a generator ensemble "
                                     f"(stage {meta.get('stage')!r}); {hint}")
    if not meta.get("done"):
      raise ckpt_lib.CheckpointError(
          f"the generators in {d} are unfinished (step {step} of {meta.get('total_steps')}); "
          "run the generators stage again to finish them")
    shape, classes = tuple(meta.get("image_shape", ())), meta.get("num_classes")
    if shape != tuple(info.image_shape) or classes != info.num_classes:
      raise ckpt_lib.CheckpointError(
          f"the generators in {d} were made for {classes} classes of {shape} images, but "
          f"dataset {info.name!r} has {info.num_classes} classes of {tuple(info.image_shape)} "
          "images")
    gen = models.Generator(latent_dim=meta["latent_dim"], image_size=shape[0],
                           channels=shape[2], width=meta["width"],
                           num_upsample=meta["num_upsample"], style=meta["style"],
                           num_classes=classes if meta.get("conditional") else 0,
                           dtype=dtype, platform=platform)
    g = int(meta["num_generators"])
    shapes = ckpt.item_shapes(step, "generators")
    expected = jax.eval_shape(lambda: generator_parts.init_generator(gen, jax.random.key(0)))
    expected = {"params": expected[0], "batch_stats": expected[1]}
    saved = {int(a.shape[0]) for a in jax.tree.leaves(shapes) if a.shape}
    same = (jax.tree.structure(shapes) == jax.tree.structure(expected) and len(saved) == 1
            and min(saved) >= g and all(
                tuple(a.shape[1:]) == tuple(b.shape)
                for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(expected))))
    if not same:
      raise ckpt_lib.CheckpointError(
          f"the generators in {d} do not match their meta ({g} generators {meta['style']!r}, "
          f"width {meta['width']}, latent {meta['latent_dim']}); the checkpoint is corrupt")
    mesh = mesh if mesh is not None else parallel.make_mesh("data")
    layout = distill_layout(layout, g, mesh.devices.size)
    # The checkpoint holds the real G first, then the padding of the run that wrote it: read
    # the first G (replicated) or as many members as this mesh splits evenly (sharded; the
    # slots past G, padding or zeros, are never drawn).
    padded = g
    if layout == "sharded":
      padded = -(-g // mesh.devices.size) * mesh.devices.size
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((padded,) + x.shape[1:], x.dtype),
                          shapes)
    target = ckpt_lib.abstract_like(shapes, parallel.split_leading(mesh) if layout == "sharded"
                                    else parallel.replicated(mesh))
    variables = ckpt.restore(step, "generators", target, pad=padded != min(saved))
  finally:
    ckpt.close()
  return {"gen": gen, "params": variables["params"], "batch_stats": variables["batch_stats"],
          "meta": meta, "directory": d, "layout": layout, "padded": padded}


def _draw_images(gen, bn_batch: int, lowering: str, key, size: int, variables, class_ids,
                 real):
  """`size` images from members [0, real) of the stacked `variables` (class_ids: theirs):
  k = ceil(size / bn_batch) draws, draw j is member perm[j mod real] of a random permutation
  of the real members, on latents keyed fold_in(key_z, j). `real` may be traced."""
  n = class_ids.shape[0]
  classes = max(gen.num_classes, 1)
  k = -(-size // bn_batch)
  k_perm, k_class, k_z = jax.random.split(key, 3)
  perm = jax.random.permutation(k_perm, n)
  if not isinstance(real, int) or real < n:  # the real members first, in permuted order
    perm = perm[jnp.argsort(perm >= real, stable=True)]
  draw = perm[jnp.arange(k) % jnp.maximum(real, 1)]
  offsets = jax.random.randint(k_class, (k,), 0, classes)
  conditions = objective.sample_conditions(class_ids[draw], bn_batch, classes, offsets[:, None])

  def one(p, bs, j, c):
    z = jax.random.normal(jax.random.fold_in(k_z, j), (bn_batch, gen.latent_dim))
    return generator_parts.generate(gen, p, bs, z, c if gen.num_classes else None)[0]
  chosen = jax.tree.map(lambda x: x[draw], variables)
  images = members_lib.map_members(one, (chosen["params"], chosen["batch_stats"], jnp.arange(k),
                             conditions), lowering)
  images = images.reshape((k * bn_batch,) + images.shape[2:])
  return jax.lax.stop_gradient(images[:size])


def make_images_fn(gens: dict, lowering: str, bn_batch: int,
                   mesh: Optional[Mesh] = None) -> Callable:
  """images_fn(key, n, batch, variables): n images from the frozen generators' `variables`
  (the loop's `batch` is unused), each generator drawing `bn_batch` images at a time: the BN
  batch it was trained with, so that its images do not depend on G or n.

  A step takes k = ceil(n / bn_batch) draws: draw j is generator perm[j mod G] of a random
  permutation of the G generators (every generator is drawn equally often over the steps, and
  at most once per step while k <= G), on latents keyed fold_in(key_z, j); a conditional
  all-class generator is given the classes (r_j + i) mod num_classes for its images i, r_j
  random. The draws' images are concatenated and the first n kept. Generator BN runs in
  training mode (its updated statistics are discarded).

  Sharded generators (gens['layout'] == 'sharded', on `mesh`): each of the D devices draws its
  n / D images the same way from its own real members, with the step key folded with its index
  (for D > 1). When D does not divide G the devices hold different numbers of real members
  r_d (the last ones fewer, possibly none), and images_fn returns (images, weights) with
  weight r_d D / G for the images of device d: a generator's share of the weighted loss is
  then the same for every generator, in expectation, as with replicated generators.
  """
  gen = gens["gen"]
  g = int(gens["meta"]["num_generators"])
  ids = np.asarray(gens["meta"]["class_ids"], np.int32)
  if gens.get("layout", "replicated") != "sharded":
    class_ids = jnp.asarray(ids)

    def images_fn(key, size, batch, variables):  # pylint: disable=unused-argument
      return _draw_images(gen, bn_batch, lowering, key, size, variables, class_ids, g)
    return images_fn

  axis = mesh.axis_names[0]
  d = mesh.devices.size
  padded = int(gens["padded"])
  per_device = padded // d
  ids = np.concatenate([ids, np.zeros((padded - g,), np.int32)])
  weighted = g % d != 0

  def local(key, variables, class_ids, size):
    index = jax.lax.axis_index(axis)
    real = g if d == 1 else jnp.clip(g - index * per_device, 0, per_device)
    k_dev = key if d == 1 else jax.random.fold_in(key, index)
    images = _draw_images(gen, bn_batch, lowering, k_dev, size, variables, class_ids, real)
    if not weighted:
      return images
    w = jnp.full((size,), real * d / g, jnp.float32)
    return images, w

  def images_fn(key, size, batch, variables):  # pylint: disable=unused-argument
    fn = jax.shard_map(functools.partial(local, size=size // d), mesh=mesh,
                       in_specs=(P(), P(axis), P(axis)),
                       out_specs=(P(axis), P(axis)) if weighted else P(axis),
                       check_vma=not platforms.is_cpu(gen.platform))
    return fn(key, variables, jax.device_put(ids, NamedSharding(mesh, P(axis))))
  return images_fn
