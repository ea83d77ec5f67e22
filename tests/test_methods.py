"""The method table and the stage interface: a new method registered from outside the package
(one stage class and its config section, defined here) runs through the same pipeline as the
built-in ones; the call path from the command line to every loss is a short chain of
importable functions."""
import inspect
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

from conftest import copy_stages, tiny_config

from datafree_jax import common
from datafree_jax import config_lib
from datafree_jax import evaluation
from datafree_jax import losses
from datafree_jax import main
from datafree_jax import methods
from datafree_jax import parallel
from datafree_jax import registry
from datafree_jax import stage as stage_lib
from datafree_jax import students
from datafree_jax import pipeline


def uniform_step(student, tx, teacher_model, scale, batch, image_shape, state, teacher_vars):
  """The student learns the teacher's argmax labels on U(-scale, scale) images."""
  key = jax.random.fold_in(jax.random.key(7), state["step"])
  images = jax.random.uniform(key, (batch,) + image_shape, minval=-scale, maxval=scale)
  labels = jnp.argmax(teacher_model.apply(teacher_vars, images, train=False), -1)

  def loss_fn(p):
    logits, upd = student.apply(common.variables_of(p, state["student"]["batch_stats"]),
                                images, train=True, mutable=["batch_stats"])
    return losses.cross_entropy(logits, labels), upd.get("batch_stats", {})
  (loss, bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["student"]["params"])
  updates, opt = tx.update(grads, state["student_opt"], state["student"]["params"])
  params = optax.apply_updates(state["student"]["params"], updates)
  return ({"student": {"params": params, "batch_stats": bs}, "student_opt": opt,
           "step": state["step"] + 1}, {"loss_ce": loss})


class UniformLabels(stage_lib.Stage):
  """A toy data-free method: hard teacher labels on uniform noise, settings in config.uniform."""
  name = "uniform_labels"
  selector = "uniform"

  def check(self, config, info):
    parallel.check_global_batch(config.uniform.batch_size)

  def steps(self, config):
    return config.uniform.steps

  def identity(self, ctx):
    return dict(students.student_identity(ctx), scale=ctx.config.uniform.scale)

  def plan(self, ctx):
    config, info = ctx.config, ctx.info
    mesh = parallel.make_mesh("data")
    tx = optax.adam(config.uniform.lr)
    student, svars, sopt = students.init_student(config, info, tx, jax.random.key(config.seed))
    state = parallel.put_replicated({"student": svars, "student_opt": sopt,
                                     "step": jnp.zeros((), jnp.int32)}, mesh)
    step = jax.jit(lambda s, tv: uniform_step(
        student, tx, ctx.teacher["model"], config.uniform.scale, config.uniform.batch_size,
        tuple(info.image_shape), s, tv), donate_argnums=(0,))
    return stage_lib.Plan(
        state=state, step=lambda s, _: step(s, ctx.teacher["variables"]),
        evaluate=evaluation.make_classifier_eval(student, lambda s: s["student"], ctx.data, mesh))

  def summarize(self, ctx, done):
    return students.student_summary(ctx, done)


UNIFORM_CONFIG = {"uniform": {"scale": (2.0, config_lib.POSITIVE),
                              "lr": (1e-3, config_lib.POSITIVE),
                              "steps": (6, config_lib.POSITIVE_INT),
                              "batch_size": (16, config_lib.POSITIVE_INT)}}


def uniform_config(method, **overrides):
  config = tiny_config("teacher", **overrides)
  config.method = method
  return config


@pytest.fixture(scope="module")
def uniform_method():
  methods.register_method("uniform_labels", (methods.TEACHER, UniformLabels()), UNIFORM_CONFIG,
                          student_stage="uniform_labels")
  yield "uniform_labels"
  registry.remove("uniform_labels")
  del config_lib.SCHEMA["uniform"]


def test_a_method_registered_from_outside_runs_like_a_built_in_one(
    uniform_method, lenet5_teacher_workdir, tmp_path, capsys):
  config = uniform_config(uniform_method, stage="uniform")
  assert config.uniform.scale == 2.0  # its defaults are part of every config now
  workdir = copy_stages(lenet5_teacher_workdir, tmp_path / "w", "teacher")
  summary = pipeline.train_and_evaluate(config, workdir)
  assert summary["student"]["steps"] == 6
  assert 0.0 <= summary["student"]["test_accuracy"] <= 1.0
  assert summary["teacher"]["test_accuracy"] > 0.5
  assert os.path.isdir(os.path.join(workdir, "uniform_labels", "6"))
  # The pipeline's services come with the interface: a finished stage is loaded, not rerun...
  capsys.readouterr()
  again = pipeline.train_and_evaluate(config, workdir)
  assert again["student"] == summary["student"]
  assert "uniform_labels: finished earlier at step 6" in capsys.readouterr().out
  # ... its checkpoint is not resumed by another config ...
  other = uniform_config(uniform_method, stage="uniform", **{"uniform.scale": 3.0})
  with pytest.raises(Exception, match="made for scale=2.0 but this run has scale=3.0"):
    pipeline.train_and_evaluate(other, workdir)
  # ... and its config section is checked with every other field, before anything is written.
  bad = uniform_config(uniform_method, **{"uniform.scale": -1.0})
  with pytest.raises(config_lib.ConfigError, match="uniform.scale must be positive"):
    pipeline.train_and_evaluate(bad, str(tmp_path / "never"))
  assert not (tmp_path / "never").exists()
  with pytest.raises(config_lib.ConfigError, match="stage 'uniform' does not apply to method "
                                                   "'dafl'; it is a stage of uniform_labels"):
    pipeline.validate(tiny_config("dafl", stage="uniform"))


def test_a_method_from_a_test_file_runs_through_the_command_line_export_and_plots(
    uniform_method, lenet5_teacher_workdir, tmp_path, capsys):
  """The registered toy method through `python -m datafree_jax.main`'s body, its student
  exported by the `export` sub-command and the run's plots drawn: nothing of the package
  names the method, all of it reads registry.Method."""
  assert registry.get(uniform_method).student_stage == "uniform_labels"
  config_file = tmp_path / "uniform.py"
  config_file.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
      "from conftest import tiny_config\n\n\n"
      "def get_config(arg):\n"
      "  config = tiny_config('teacher', stage='all', **{'teacher.steps': 1})\n"
      f"  config.method = {uniform_method!r}\n"
      "  return config\n")
  workdir = copy_stages(lenet5_teacher_workdir, tmp_path / "w", "teacher")
  assert main.main(["main", f"--config={config_file}", "--config.uniform.steps=4",
                    f"--workdir={workdir}"]) == 0
  out = capsys.readouterr().out
  assert "student lenet5_half: final test accuracy" in out and "after 4 steps" in out
  results = json.loads(open(os.path.join(workdir, "results.json")).read())
  assert results["student"]["checkpoint"] == os.path.join(workdir, "uniform_labels")
  assert "accuracy.png" in os.listdir(os.path.join(workdir, "plots"))
  # Export finds the student through the method's description even when results.json (here
  # rewritten as a later stage=teacher run leaves it) names none.
  del results["student"]
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f)
  assert main.main(["main", "export", f"--workdir={workdir}", "--format=stablehlo"]) == 0
  line = capsys.readouterr().out
  assert "export: student lenet5_half of " + os.path.join(workdir, "uniform_labels") in line
  assert os.path.exists(os.path.join(workdir, "export", "student.stablehlo"))


# Frames that are syntax, not design: one-line adapters and comprehensions.
_ANONYMOUS = ("<lambda>", "<listcomp>", "<dictcomp>", "<genexpr>", "<setcomp>")


# 7 functions from train_and_evaluate to a loss, 9 where a synthesis stage's loop step runs a
# round whose iterations are the body of a lax.fori_loop, or its competing student's steps in
# another (synthesis_step, competitor_round, distill_on_pool, pool_distill_iteration,
# distill_step, student_kd_update).
MAX_CHAIN = 9
# One or two rounds of tiny synthesis for the methods that have rounds.
CHAIN_RUN_SIZES = {
    "deepinversion": {"deepinversion.rounds": 1, "deepinversion.batch_size": 8,
                      "deepinversion.iterations": 1, "deepinversion.kd_steps": 1,
                      "deepinversion.eval_every": 0},
    "cmi": {"cmi.rounds": 1, "cmi.batch_size": 8, "cmi.iterations": 1, "cmi.kd_steps": 1,
            "cmi.bank_size": 16, "cmi.n_neg": 8, "cmi.eval_every": 0},
    "fast": {"fast.rounds": 2, "fast.warmup": 1, "fast.batch_size": 8, "fast.iterations": 1,
             "fast.kd_steps": 1, "fast.latent_dim": 8, "fast.width": 4, "fast.eval_every": 0},
}


@pytest.mark.slow  # every method's whole pipeline
def test_every_loss_is_reached_through_a_short_chain_of_importable_functions(
    tmp_path, monkeypatch):
  """From train_and_evaluate (the command line adds main.main and pipeline.main_entry) to each
  loss function: at most MAX_CHAIN named functions of the package, each importable (a module-level
  function or a method of a module-level class, no closures), in every method the package
  registers (methods.BUILT_IN_NAMES) and both lowerings of the ensemble step. Each loss
  function is wrapped to record the call stack it is traced from, then runs unchanged."""
  pkg = os.path.dirname(os.path.abspath(losses.__file__))
  chains = {}

  def recording(name, fn):
    def wrapper(*args, **kwargs):
      names, f = [], sys._getframe(1)  # pylint: disable=protected-access
      while f is not None:
        code = f.f_code
        if (code.co_filename.startswith(pkg) and code.co_name not in _ANONYMOUS
            and code.co_filename != losses.__file__):
          names.append(f"{os.path.relpath(code.co_filename, pkg)}:{code.co_qualname}")
        f = f.f_back
      chains.setdefault(name, set()).add(tuple(reversed(names)))
      return fn(*args, **kwargs)
    return wrapper

  for name in dir(losses):
    fn = getattr(losses, name)
    if inspect.isfunction(fn) and fn.__module__ == losses.__name__ and not name.startswith("_"):
      monkeypatch.setattr(losses, name, recording(name, fn))
  runs = [("teacher", {})] + [(m, CHAIN_RUN_SIZES.get(m, {})) for m in methods.BUILT_IN_NAMES
                              if m not in ("teacher", "ensemble")] + [
      ("ensemble", {"ensemble.lowering": lowering}) for lowering in ("loop", "vmap")]
  for i, (method, overrides) in enumerate(runs):
    config = tiny_config(method, **{
        "teacher.steps": 1, "teacher.model": "lenet5_bn", "teacher.bn_stats_per_class": 2,
        "student.steps": 1, "ensemble.steps": 1, "ensemble.num_generators": 2,
        "ensemble.batch_per_generator": 4, "ensemble.eval_every": 0,
        "stage": "all" if method == "teacher" else "train", **overrides})
    if method != "teacher":  # the teacher of the first run
      copy_stages(tmp_path / "0", tmp_path / str(i), "teacher")
    pipeline.train_and_evaluate(config, str(tmp_path / str(i)))
  assert {"cross_entropy", "kd_loss", "dafl_generator_loss", "inceptionism_loss",
          "bn_moment_matching", "adi_competition_loss", "deepinversion_tv_l1",
          "contrastive_instance_loss", "decision_adversarial_loss",
          "bn_momentum_matching"} <= set(chains)
  for loss, paths in chains.items():
    for path in paths:
      assert path[0] == "pipeline.py:train_and_evaluate", (loss, path)
      assert len(path) <= MAX_CHAIN, (loss, path)
      assert not [f for f in path if "<locals>" in f], (loss, path)


def test_the_summary_prints_any_stages_entries_without_knowing_the_stage():
  summary = {"seconds": 3.0, "workdir": "/w", "config": {}, "plots": [],
             "teacher": {"model": "lenet5", "test_accuracy": 0.98, "checkpoint": "/w/teacher"},
             "my_stage": {"members": 4, "steps": 7, "eval": {"agreement": 0.5},
                          "checkpoint": "/w/my_stage"},
             "student": {"model": "lenet5_half", "test_accuracy": 0.9, "steps": 7,
                         "checkpoint": "/w/my_student"}}
  text = pipeline._summary_text(summary)  # pylint: disable=protected-access
  assert "my_stage: members 4, steps 7, agreement 0.5000\n  checkpoint: /w/my_stage" in text
  assert "student lenet5_half: final test accuracy 0.9000 after 7 steps" in text


def test_export_and_plots_know_the_built_in_methods_without_the_pipeline():
  """Used on their own (a notebook exporting a finished run), export and plots read the
  registry the built-in methods are in."""
  code = ("from datafree_jax import export, plots, registry\n"
          "print(registry.student_stage('ensemble'), registry.image_stages())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       timeout=120).stdout
  assert out.strip() == ("distill_generators ('dafl', 'generators', 'deepinversion', 'cmi', "
                         "'fast')")
