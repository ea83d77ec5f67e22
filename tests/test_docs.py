"""The doc check: every command in README.md and docs/*.md is checked, cheaply but for real.

The cases are generated from the files at collection time: every logical command of every
fenced shell block (``` or ```sh / bash / shell), every command in backticks in the text that
starts like one (`python -m ...`, `pip install ...`, ...), every ```python block and every
relative link. A command of a kind this file does not know fails, naming the file and line, so
that no command can be added to the docs unchecked. Fences say what a block is: a shell block
holds commands, ```python code, ```text output, diagrams or formulas (and may not hold a command);
any other fence, and an indented code block, is a failure.

How each kind of command is checked (nothing is trained, nothing is downloaded):
  python -m datafree_jax.main ARGS, datafree-jax ARGS   the command line is parsed, the config
      loaded, the --config.a.b overrides applied and the config validated (check_main_command)
  python -m datafree_jax.main export ARGS, datafree-jax export ARGS   the export flags parsed
      and the formats read (check_export_command)
  python -m datafree_jax.main make-jpeg-dataset ARGS   its flags parsed and the settings
      checked (check_make_dataset_command)
  pip install ...         the extras exist in setup.py's extras_require; a named package is a
                          requirement of setup.py, with the same version pin when one is given
  python -m pytest ...    the test paths (and test names after ::) exist; options are known
  python -m benchmarks.X, python benchmarks/X.py, bash benchmarks/X.sh   the file exists (either
                          layout); its --flags appear in it
  launch/X ..., bash launch/X ..., sbatch [opts] launch/X ...   the script exists, handles each
                          of its flags, and its --dry-run with these arguments exits 0; the
                          job's own arguments are checked as a datafree_jax.main command;
                          sbatch's options are the script's #SBATCH options
  launch/run_resumable.sh ARGS   its arguments are a datafree_jax.main command
  gcloud ...              a command (or a part of one) that launch/tpu_pod.sh --dry-run prints
  tensorboard --logdir D  D is a run's tensorboard/ folder, the one the pipeline writes
  cd ~/datafree_jax ..., PY ...   a step the launchers run: found, with <...> and PY as
                          wildcards, in what their --dry-run prints
  cd DIR                  DIR exists in the repository
  VAR=value CMD, export VAR=value   VAR is one the code, the launchers or the benchmarks
                          read, or a known one of XLA, CUDA or JAX; CMD is checked as above;
                          nohup CMD likewise
"""
import ast
import functools
import importlib
import os
import re
import runpy
import shlex
import subprocess
import sys
import types
import unittest.mock

import pytest

from conftest import REPO_ROOT

from datafree_jax import distributed
from datafree_jax import export
from datafree_jax import main
from datafree_jax import pipeline

DOC_FILES = ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(REPO_ROOT, "docs"))
    if f.endswith(".md"))

SHELL_FENCES = ("", "sh", "bash", "shell")
PYTHON_FENCES = ("python",)
TEXT_FENCES = ("text",)
# Backticked text in prose that is a command (and so is checked like one in a shell block).
INLINE_PREFIXES = ("python -m ", "python benchmarks/", "pip install ", "datafree-jax ",
                   "bash ", "sbatch ", "gcloud ", "tensorboard ")
# What a ```text block may not start a line with: it would be a command nobody checks.
TEXT_COMMAND = re.compile(r"^(python\S* |pip |datafree-jax\b|launch/\S+\.(sh|sbatch)\b|bash |"
                          r"sbatch |gcloud |tensorboard |pytest\b|export |cd |nohup |"
                          r"[A-Z_]+=\S* )")
# Links to files that someone else is writing; checked once they exist.
PENDING_LINKS = {"docs/architecture.md"}


# --- Reading the docs -----------------------------------------------------------------------

class Case:
  """One thing to check: kind is 'shell', 'python', 'link' or 'error' (a doc that breaks the
  rules of this file); where is FILE:LINE."""

  def __init__(self, kind, path, line, text):
    self.kind, self.path, self.line, self.text = kind, path, line, text

  @property
  def where(self):
    return f"{self.path}:{self.line}"

  def id(self):
    short = re.sub(r"\s+", " ", self.text)[:60]
    return f"{self.where} {self.kind}: {short}"


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)\s*$")
_LIST_ITEM = re.compile(r"^\s*([-*+]|\d+\.)\s")


def _shell_commands(path, lines):
  """The logical commands of a shell block: lines joined at a trailing backslash; blank lines
  and comment lines skipped. lines: [(line number, text)]."""
  out, buf, start = [], [], None
  for number, text in lines:
    if not buf and (not text.strip() or text.strip().startswith("#")):
      continue
    if not buf:
      start = number
    if text.rstrip().endswith("\\"):
      buf.append(text.rstrip()[:-1])
      continue
    buf.append(text)
    out.append(Case("shell", path, start, " ".join(s.strip() for s in buf)))
    buf = []
  if buf:
    out.append(Case("error", path, start, "a command ends with a line continuation: "
                    + " ".join(buf)))
  return out


def _inline_commands(path, prose):
  """Commands in backticks in the prose: prose is [(line number, text)] outside the fences;
  a span may continue onto the next line of its paragraph."""
  out = []
  paragraph = []

  def flush():
    if not paragraph:
      return
    text = "\n".join(t for _, t in paragraph)
    first = paragraph[0][0]
    for m in re.finditer(r"(`+)(.+?)\1", text, flags=re.S):
      span = re.sub(r"\s+", " ", m.group(2)).strip()
      if span.startswith(INLINE_PREFIXES):
        out.append(Case("shell", path, first + text.count("\n", 0, m.start()), span))
    paragraph.clear()

  for number, text in prose:
    if text.strip():
      paragraph.append((number, text))
    else:
      flush()
  flush()
  return out


def _links(path, prose):
  out = []
  for number, text in prose:
    for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
      target = m.group(1)
      if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, ...
        out.append(Case("link", path, number, target))
  return out


def read_doc(path):
  """Every case of one doc file."""
  with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
    lines = f.read().split("\n")
  cases, prose = [], []
  fence, lang, block, block_start = None, None, [], None
  last_prose = ""  # the last non-blank prose line, for telling a list continuation apart
  for number, text in enumerate(lines, 1):
    m = _FENCE.match(text)
    if fence is None and m:
      fence, lang, block, block_start = m.group(2), m.group(3).lower(), [], number
      continue
    if fence is not None:
      if m and m.group(2).startswith(fence) and not m.group(3):
        cases.extend(_block_cases(path, block_start, lang, block))
        fence = None
      else:
        block.append((number, text))
      continue
    prose.append((number, text))
    if (text.startswith("    ") and text.strip() and number > 1 and not lines[number - 2].strip()
        and not (last_prose.startswith((" ", "\t")) or _LIST_ITEM.match(last_prose)
                 or text.lstrip().startswith("|"))):
      cases.append(Case("error", path, number, "an indented code block: use a fenced block "
                        "(```sh for commands, ```python, ```text) so that it is checked"))
    if text.strip():
      last_prose = text
  if fence is not None:
    cases.append(Case("error", path, block_start, "a code block that is never closed"))
  cases.extend(_inline_commands(path, prose))
  cases.extend(_links(path, prose))
  return cases


def _block_cases(path, start, lang, block):
  if lang in SHELL_FENCES:
    return _shell_commands(path, block)
  if lang in PYTHON_FENCES:
    code = "\n".join(t for _, t in block)
    return [Case("python", path, start, code)]
  if lang in TEXT_FENCES:
    return [Case("error", path, number, f"a command in a ```text block: {t.strip()}")
            for number, t in block if TEXT_COMMAND.match(t.strip())]
  return [Case("error", path, start, f"a code block fenced ```{lang}: use ```sh for commands, "
               "```python for code, ```text for anything else")]


def all_cases():
  return [c for path in DOC_FILES for c in read_doc(path)]


CASES = all_cases()


# --- The checks of each kind of command -----------------------------------------------------

class DocError(AssertionError):
  pass


def validate_config(config):
  """The pipeline's check of a loaded config, as the command line makes it before a run."""
  pipeline.validate(config)


def check_main_command(argv):
  """python -m datafree_jax.main ARGV: parsed, config loaded, overrides applied, validated."""
  args = main.parse_command_line(list(argv))
  if args["help"]:
    return
  distributed.settings(**{"mode": "auto", **args["distributed"]}, environ={})
  config = main.load_config(args["config"])
  for key, text in args["overrides"]:
    main.apply_override(config, key, text)
  validate_config(config)


def check_make_dataset_command(argv):
  """python -m datafree_jax.main make-jpeg-dataset ARGV: its flags as the command line reads
  them, the settings buildable."""
  args = main.parse_make_dataset_command_line(list(argv))
  args["settings"].check(args["name"])


def check_export_command(argv):
  """python -m datafree_jax.main export ARGV (ARGV: what follows 'export'): its flags as the
  command line reads them, the formats known."""
  args = main.parse_export_command_line(list(argv))
  export.parse_formats(args["format"])


@functools.lru_cache(maxsize=None)
def setup_kwargs():
  """What setup.py passes to setuptools.setup."""
  import setuptools  # pylint: disable=g-import-not-at-top
  with unittest.mock.patch.object(setuptools, "setup") as setup:
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
      runpy.run_path(os.path.join(REPO_ROOT, "setup.py"), run_name="__main__")
    finally:
      os.chdir(cwd)
  return setup.call_args.kwargs


def _norm(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def check_pip(args):
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  if not args or args[0] != "install":
    raise DocError(f"pip {' '.join(args)}: only `pip install` is checked")
  kw = setup_kwargs()
  extras = kw["extras_require"]
  known = {}
  for spec in list(kw["install_requires"]) + [s for v in extras.values() for s in v]:
    r = Requirement(spec)
    known.setdefault(_norm(r.name), set()).add(str(r.specifier))
  rest = args[1:]
  targets = [a for a in rest if not a.startswith("-")]
  for opt in (a for a in rest if a.startswith("-")):
    if opt not in ("-e", "--editable", "-q", "-U", "--upgrade", "--user"):
      raise DocError(f"pip option {opt} is not one this check knows")
  if not targets:
    raise DocError("pip install without anything to install")
  for target in targets:
    m = re.fullmatch(r"\.(?:\[([^\]]*)\])?", target)
    if m:
      for extra in filter(None, (m.group(1) or "").split(",")):
        if extra.strip() not in extras:
          raise DocError(f"pip install {target}: setup.py has no extra {extra.strip()!r} "
                         f"(extras: {', '.join(sorted(extras))})")
      continue
    r = Requirement(target)
    if _norm(r.name) not in known:
      raise DocError(f"pip install {target}: {r.name} is not a requirement of setup.py")
    if str(r.specifier) and str(r.specifier) not in known[_norm(r.name)]:
      raise DocError(f"pip install {target}: setup.py pins {r.name} as "
                     f"{sorted(known[_norm(r.name)])}")


_PYTEST_OPTIONS = {"-q": 0, "-x": 0, "-v": 0, "-s": 0, "-n": 1, "--dist": 1, "-k": 1, "-m": 1}


def check_pytest(args):
  i = 0
  while i < len(args):
    a = args[i]
    i += 1
    if a.startswith("-"):
      name, eq, _ = a.partition("=")
      if name not in _PYTEST_OPTIONS:
        raise DocError(f"pytest option {a} is not one this check knows")
      if _PYTEST_OPTIONS[name] and not eq:
        i += 1
      continue
    path, _, test = a.partition("::")
    full = os.path.join(REPO_ROOT, path)
    if not os.path.exists(full):
      raise DocError(f"pytest path {path} does not exist")
    if test:
      with open(full, encoding="utf-8") as f:
        if not re.search(rf"^def {re.escape(test.split('[')[0])}\(", f.read(), re.M):
          raise DocError(f"{path} has no test {test}")


def _benchmark_file(name):
  for rel in (f"benchmarks/{name}.py", f"benchmarks/{name}/__main__.py"):
    if os.path.isfile(os.path.join(REPO_ROOT, rel)):
      return rel
  raise DocError(f"no benchmark {name}: neither benchmarks/{name}.py nor "
                 f"benchmarks/{name}/__main__.py exists")


def check_benchmark(name, args):
  rel = _benchmark_file(name)
  with open(os.path.join(REPO_ROOT, rel), encoding="utf-8") as f:
    source = f.read()
  for a in args:
    if not a.startswith("--"):
      continue
    flag = a.partition("=")[0]
    candidates = [flag]
    if flag.startswith("--no_"):
      candidates.append("--" + flag[len("--no_"):])
    if not any(f'"{c}"' in source or f"'{c}'" in source for c in candidates):
      raise DocError(f"{rel} takes no flag {flag}")


def _read(rel):
  with open(os.path.join(REPO_ROOT, rel), encoding="utf-8") as f:
    return f.read()


def _launcher_job_argv(args):
  """The datafree_jax.main arguments a launcher passes on: --config, --workdir, and the
  flags after --."""
  before, extra = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args else (
      args, [])
  job = [a for a in before if a.startswith(("--config=", "--workdir="))]
  return job + extra


def check_launcher(script, args, sbatch_options=(), direct=False):
  rel = os.path.normpath(script)
  full = os.path.join(REPO_ROOT, rel)
  if not rel.startswith("launch" + os.sep) or not os.path.isfile(full):
    raise DocError(f"no launch script {script}")
  if direct and not os.access(full, os.X_OK):
    raise DocError(f"{script} is not executable")
  source = _read(rel)
  for opt in sbatch_options:
    name = opt.partition("=")[0]
    if not re.search(rf"^#SBATCH {re.escape(name)}\b", source, re.M):
      raise DocError(f"sbatch {name}: not an #SBATCH option of {script}")
  if rel == os.path.join("launch", "run_resumable.sh"):
    check_main_command(args)  # every argument goes to datafree_jax.main
    return
  before = args[:args.index("--")] if "--" in args else args
  for a in before:
    if not a.startswith("-"):
      raise DocError(f"{script}: unexpected argument {a}")
    name = a.partition("=")[0]
    if not re.search(rf"(^|[\s|(]){re.escape(name)}(\)|=\*)", source, re.M):
      raise DocError(f"{script} does not handle {name}")
  argv = list(args) if "--dry-run" in args else ["--dry-run", *args]
  r = subprocess.run(["bash", full, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                     timeout=60, check=False)
  if r.returncode:
    raise DocError(f"{script} --dry-run exited {r.returncode}: {r.stderr.strip()[-500:]}")
  check_main_command(_launcher_job_argv(args))


@functools.lru_cache(maxsize=None)
def launcher_dry_runs():
  """The lines the launchers' --dry-run prints, for a few option sets."""
  runs = [("tpu_pod.sh", "--config=c", "--workdir=gs://b/r"),
          ("tpu_pod.sh", "--config=c", "--workdir=gs://b/r", "--queued"),
          ("tpu_pod.sh", "--config=c", "--workdir=gs://b/r", "--python=python3"),
          ("gpu_host.sh", "--config=c", "--workdir=w"),
          ("gpu_host.sh", "--config=c", "--workdir=w", "--venv=.venv", "--provision"),
          ("slurm.sbatch", "--config=c", "--workdir=w")]
  lines = []
  for script, *args in runs:
    r = subprocess.run(["bash", os.path.join(REPO_ROOT, "launch", script), "--dry-run", *args],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True)
    lines.extend(r.stdout.splitlines())
  return tuple(lines)


def _dry_run_commands():
  """Each command a dry run prints ('+ cmd', or indented in its follow-up text), as tokens,
  plus the --command= of every ssh as its own text."""
  out = []
  for line in launcher_dry_runs():
    text = line[2:] if line.startswith("+ ") else line.strip()
    try:
      tokens = shlex.split(text)
    except ValueError:
      continue
    out.append(tokens)
  return out


def check_gcloud(args):
  positional = [a for a in args if not a.startswith("-")]
  flags = {a for a in args if a.startswith("-")}
  for tokens in _dry_run_commands():
    if tokens[:1] != ["gcloud"]:
      continue
    printed = tokens[1:]
    if [a for a in printed if not a.startswith("-")] == positional and flags <= set(printed):
      return
  raise DocError("launch/tpu_pod.sh --dry-run prints no such gcloud command")


def check_tensorboard(args):
  if len(args) == 2 and args[0] == "--logdir":
    logdir = args[1]
  elif len(args) == 1 and args[0].startswith("--logdir="):
    logdir = args[0].partition("=")[2]
  else:
    raise DocError("tensorboard: expected --logdir DIR")
  if 'paths.join(workdir, "tensorboard")' not in _read("datafree_jax/pipeline.py"):
    raise DocError("the pipeline no longer writes WORKDIR/tensorboard")
  if os.path.basename(logdir.rstrip("/")) != "tensorboard":
    raise DocError(f"tensorboard --logdir {logdir}: a run writes its logs to WORKDIR/tensorboard")


def check_launcher_step(text):
  """A step the launchers run (platforms.md): <...> and PY are wildcards."""

  def norm(s):
    return re.sub(r"\s+", " ", s.replace("'\\''", "").replace("'", "").replace('"', "")).strip()

  pattern = ""
  for part in re.split(r"(<[^>]*>|\bPY\b)", norm(text)):
    if part.startswith("<"):
      pattern += ".*?"
    elif part == "PY":
      pattern += r"\S+"
    else:
      pattern += re.escape(part)
  printed = []
  for tokens in _dry_run_commands():
    printed.append(norm(" ".join(tokens)))
    printed.extend(norm(t.partition("=")[2]) for t in tokens if t.startswith("--command="))
  if not any(re.search(pattern, p) for p in printed):
    raise DocError("no launcher's --dry-run prints this step")


_EXTERNAL_VARS = ("XLA_FLAGS", "CUDA_VISIBLE_DEVICES", "PATH")


def check_env_var(name):
  if name in _EXTERNAL_VARS or name.startswith("JAX_"):
    return
  for folder in ("datafree_jax", "launch", "benchmarks"):
    for root, _, files in os.walk(os.path.join(REPO_ROOT, folder)):
      for f in files:
        if f.endswith((".py", ".sh", ".sbatch")):
          with open(os.path.join(root, f), encoding="utf-8") as fh:
            if name in fh.read():
              return
  raise DocError(f"{name}: no code, launcher or benchmark reads this variable")


_OPERATORS = ("&&", "||", ";", "|", "&")
_REDIRECTS = (">", ">>", "<", ">&", "&>", "<&")


def simple_commands(text):
  """The simple commands of a command line, each as its tokens, redirections removed."""
  lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  tokens = list(lexer)
  out, cur = [], []
  i = 0
  while i < len(tokens):
    t = tokens[i]
    if t in _OPERATORS:
      if cur:
        out.append(cur)
      cur = []
    elif t in _REDIRECTS:
      if cur and cur[-1].isdigit():
        cur.pop()  # the 2 of 2>&1
      i += 1       # the target
    else:
      cur.append(t)
    i += 1
  if cur:
    out.append(cur)
  return out


def check_simple_command(tokens):
  while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
    check_env_var(tokens[0].partition("=")[0])
    tokens = tokens[1:]
  if not tokens:
    return
  head, args = tokens[0], tokens[1:]
  if head == "nohup":
    return check_simple_command(args)
  if head == "export":
    for a in args:
      check_env_var(a.partition("=")[0])
    return
  if head == "cd":
    if len(args) != 1 or not os.path.isdir(os.path.join(REPO_ROOT, args[0])):
      raise DocError(f"cd {' '.join(args)}: no such folder in the repository")
    return
  if head in ("python", "python3"):
    if args[:2] == ["-m", "datafree_jax.main"]:
      if args[2:3] == ["export"]:
        return check_export_command(args[3:])
      if args[2:3] == ["make-jpeg-dataset"]:
        return check_make_dataset_command(args[3:])
      return check_main_command(args[2:])
    if args[:2] == ["-m", "pytest"]:
      return check_pytest(args[2:])
    if args[:2] == ["-m", "pip"]:
      return check_pip(args[2:])
    if args[:1] == ["-m"] and len(args) > 1 and args[1].startswith("benchmarks."):
      return check_benchmark(args[1].split(".", 1)[1], args[2:])
    if args and re.fullmatch(r"benchmarks/\w+\.py", args[0]):
      return check_benchmark(args[0][len("benchmarks/"):-3], args[1:])
  if head == "datafree-jax":
    scripts = setup_kwargs()["entry_points"]["console_scripts"]
    if "datafree-jax=datafree_jax.main:cli" not in scripts:
      raise DocError(f"setup.py installs no datafree-jax for datafree_jax.main: {scripts}")
    if args[:1] == ["export"]:
      return check_export_command(args[1:])
    if args[:1] == ["make-jpeg-dataset"]:
      return check_make_dataset_command(args[1:])
    return check_main_command(args)
  if head == "pip":
    return check_pip(args)
  if head == "pytest":
    return check_pytest(args)
  if head == "bash" and args and args[0].startswith("benchmarks/") and args[0].endswith(".sh"):
    if not os.path.isfile(os.path.join(REPO_ROOT, args[0])):
      raise DocError(f"no {args[0]}")
    return
  if head == "bash" and args and args[0].startswith("launch/"):
    return check_launcher(args[0], args[1:])
  if head.startswith("launch/"):
    return check_launcher(head, args, direct=True)
  if head == "sbatch":
    script = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    if script is None:
      raise DocError("sbatch without a script")
    return check_launcher(args[script], args[script + 1:], sbatch_options=args[:script])
  if head == "gcloud":
    return check_gcloud(args)
  if head == "tensorboard":
    return check_tensorboard(args)
  raise DocError(f"a command this check does not know: {' '.join(tokens)} (teach "
                 "tests/test_docs.py how to check it)")


def check_command(text):
  if text.startswith("cd ~/datafree_jax") or text.startswith("PY "):
    return check_launcher_step(text)
  commands = simple_commands(text)
  if not commands:
    raise DocError("an empty command")
  for tokens in commands:
    check_simple_command(tokens)


def check_python(code):
  """Compiles; every name taken from datafree_jax exists."""
  tree = ast.parse(code)
  modules = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "datafree_jax":
      module = importlib.import_module(node.module)
      for alias in node.names:
        if not hasattr(module, alias.name):
          try:
            modules[alias.asname or alias.name] = importlib.import_module(
                f"{node.module}.{alias.name}")
          except ImportError:
            raise DocError(f"{node.module} has no {alias.name}") from None
        else:
          value = getattr(module, alias.name)
          if isinstance(value, types.ModuleType):
            modules[alias.asname or alias.name] = value
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "datafree_jax":
          module = importlib.import_module(alias.name)
          modules[alias.asname or alias.name] = module
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in modules and not hasattr(modules[node.value.id], node.attr)):
      raise DocError(f"{modules[node.value.id].__name__} has no {node.attr}")


def _slug(heading):
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(rel):
  out, seen = set(), {}
  in_fence = False
  for line in _read(rel).split("\n"):
    if _FENCE.match(line):
      in_fence = not in_fence
      continue
    m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if m and not in_fence:
      slug = _slug(m.group(1))
      n = seen.get(slug, 0)
      seen[slug] = n + 1
      out.add(slug if n == 0 else f"{slug}-{n}")
  return out


def check_link(path, target):
  file_part, _, anchor = target.partition("#")
  rel = (os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part
         else path)
  if not os.path.exists(os.path.join(REPO_ROOT, rel)):
    if rel in PENDING_LINKS:
      return
    raise DocError(f"link to {target}: {rel} does not exist")
  if anchor and rel.endswith(".md") and anchor not in anchors(rel):
    raise DocError(f"link to {target}: {rel} has no heading #{anchor}")


# --- The tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_doc_case(case, monkeypatch):
  monkeypatch.chdir(REPO_ROOT)  # the docs' relative paths are from the repository root
  try:
    if case.kind == "error":
      raise DocError(case.text)
    if case.kind == "shell":
      check_command(case.text)
    elif case.kind == "python":
      check_python(case.text)
    elif case.kind == "link":
      check_link(case.path, case.text)
  except Exception as e:  # pylint: disable=broad-except
    pytest.fail(f"{case.where}: {case.text}\n  -> {type(e).__name__}: {e}", pytrace=False)


def test_every_doc_has_cases_and_the_readme_opens_with_the_ci_lines():
  paths = {c.path for c in CASES}
  assert "README.md" in paths and len(CASES) > 50, paths
  first = [c for c in CASES if c.path == "README.md" and c.kind == "shell"][:2]
  assert [c.text for c in first] == [
      "pip install -e . && python -m datafree_jax.main",
      "pip install -e '.[test]' && python -m pytest -q -n 2 --dist loadfile -m 'not slow' tests"]
  assert first[1].text in _read(".ci/run")  # CI runs the README's test line verbatim


@pytest.mark.parametrize("text, error", [
    ("python -m datafree_jax.main --config=mnist5k:method=nope", "method"),
    ("python -m datafree_jax.main --config.student.stepz=5", "steps"),
    ("python -m datafree_jax.main export --workdir=w --format=jpeg", "jpeg"),
    ("python -m datafree_jax.main make-jpeg-dataset --min_side=9 --max_side=8", "min_side"),
    ("pip install -e '.[nosuchextra]'", "nosuchextra"),
    ("python benchmarks/nosuch.py", "nosuch"),
    ("python benchmarks/step_speed.py --nosuchflag=1", "nosuchflag"),
    ("launch/gpu_host.sh --config=mnist5k --workdir=w --nosuch=1", "--nosuch"),
    ("sbatch --nosuch=1 launch/slurm.sbatch --config=mnist5k --workdir=w", "--nosuch"),
    ("gcloud compute tpus tpu-vm delete datafree-jax --nosuch", "gcloud"),
    ("tensorboard --logdir /tmp/run", "tensorboard"),
    ("python -m pytest tests/test_nosuch.py", "test_nosuch"),
    ("make all", "does not know"),
])
def test_the_checks_refuse_a_bad_command(text, error, monkeypatch):
  monkeypatch.chdir(REPO_ROOT)
  with pytest.raises(Exception, match=re.escape(error)):
    check_command(text)


def test_the_reader_refuses_unchecked_blocks(tmp_path, monkeypatch):
  doc = tmp_path / "x.md"
  doc.write_text("text\n\n    python -m datafree_jax.main\n\n```console\n$ ls\n```\n\n"
                 "```text\npip install foo\n```\n", encoding="utf-8")
  monkeypatch.setattr(sys.modules[__name__], "REPO_ROOT", str(tmp_path))
  errors = [c.text for c in read_doc("x.md") if c.kind == "error"]
  assert len(errors) == 3, errors
