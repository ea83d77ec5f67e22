"""The built-in methods, registered in registry.METHODS, and `register_method` for new ones.

    method      stages run                                                   student from
    teacher     teacher                                                      -
    dafl        teacher -> dafl (joint generator + student)                  dafl
    ensemble    teacher -> generators (Luo et al.'s per-class ensemble)      distill_generators
                        -> distill_generators
    kd_data     teacher -> distill_data (KD on the real training images:     distill_data
                upper bound)
    kd_noise    teacher -> distill_noise (KD on N(0, 1) noise: lower bound)  distill_noise
    deepinversion  teacher -> deepinversion (Yin et al.'s image optimisation      distill_deepinversion
                against the teacher, with a competing student; the images
                kept in a pool) -> distill_deepinversion
    cmi         teacher -> cmi (Fang et al.'s contrastive model inversion: a    distill_cmi
                generator per round against the teacher, a contrastive loss
                over a memory bank, a competing student; images kept in a
                pool) -> distill_cmi
    fast        teacher -> fast (Fang et al.'s Fast-DFKD: a meta-learned         fast
                generator, a few steps per round, its images kept in a pool
                that the student is distilled on between rounds)

A new method is one module with its stage(s) (stage.Stage, built on the shared parts:
students.py, generator_parts.py, ...) and one `register_method` call with its config section;
export, plots, the dry run and the summary read what it registers.
"""
from __future__ import annotations

from datafree_jax import config_lib
from datafree_jax import registry
from datafree_jax.stages import cmi
from datafree_jax.stages import dafl
from datafree_jax.stages import deepinversion
from datafree_jax.stages import distill
from datafree_jax.stages import ensemble
from datafree_jax.stages import fast_dfkd
from datafree_jax.stages import teacher

TEACHER = teacher.STAGE


def register_method(name: str, stages, config_sections: dict | None = None, *,
                    student_stage: str = "", image_stages: tuple = (),
                    description: str = "") -> registry.Method:
  """Adds method `name` that runs `stages` (stage.Stage objects, the teacher stage first, e.g.
  methods.TEACHER). `student_stage` names the stage whose checkpoint holds the final student
  (what export reads), `image_stages` the stages whose sample grids and generator losses the
  plots show. `config_sections` ({section: {field: (default, config_lib.Domain)}}) adds the
  method's own config sections to the schema, with their defaults (config_lib.base_config
  then has them)."""
  for section, fields in (config_sections or {}).items():
    config_lib.register_section(section, fields)
  return registry.add(registry.Method(name, tuple(stages), student_stage, tuple(image_stages),
                                      description))


BUILT_IN = (
    registry.Method("teacher", (TEACHER,), description="train (or import) the teacher only"),
    registry.Method("dafl", (TEACHER, dafl.STAGE), student_stage=dafl.STAGE.name,
                    image_stages=(dafl.STAGE.name,),
                    description="DAFL (Chen et al. 2019): generator and student in one loop"),
    registry.Method("ensemble", (TEACHER, ensemble.GENERATORS, ensemble.DISTILL),
                    student_stage=ensemble.DISTILL.name, image_stages=(ensemble.GENERATORS.name,),
                    description="Luo et al. 2020: per-class generators, then distillation"),
    registry.Method("kd_data", (TEACHER, distill.DATA), student_stage=distill.DATA.name,
                    description="KD on the real training images (upper bound)"),
    registry.Method("kd_noise", (TEACHER, distill.NOISE), student_stage=distill.NOISE.name,
                    description="KD on N(0, 1) noise images (lower bound)"),
)
for _method in BUILT_IN:
  registry.add(_method)

register_method(
    "deepinversion", (TEACHER, deepinversion.SYNTHESIS, deepinversion.DISTILL),
    deepinversion.CONFIG_SECTIONS, student_stage=deepinversion.DISTILL.name,
    image_stages=(deepinversion.SYNTHESIS.name,),
    description="DeepInversion (Yin et al. 2020): images optimised against the teacher, then "
                "distillation on them")

register_method(
    "cmi", (TEACHER, cmi.SYNTHESIS, cmi.DISTILL), cmi.CONFIG_SECTIONS,
    student_stage=cmi.DISTILL.name, image_stages=(cmi.SYNTHESIS.name,),
    description="CMI (Fang et al. 2021): generators inverted from the teacher with a "
                "contrastive loss over a memory bank, then distillation on their images")

register_method(
    "fast", (TEACHER, fast_dfkd.STAGE), fast_dfkd.CONFIG_SECTIONS,
    student_stage=fast_dfkd.STAGE.name, image_stages=(fast_dfkd.STAGE.name,),
    description="Fast-DFKD (Fang et al. 2022): a meta-learned generator, a few steps per round, "
                "and the student distilled on the rounds' images")

# The methods the package itself registers (taken at import, before a user registers more):
# what tests of "every method" run.
BUILT_IN_NAMES = tuple(registry.names())
