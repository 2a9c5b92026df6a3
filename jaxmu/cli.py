"""The `jaxmu` command (`jaxmu <subcommand> [flags]`, also `python -m jaxmu`) and what every
subcommand shares: configs by short name, flag parsing that turns config mistakes into one clear
line, the persistent compilation cache, and multi-host start-up (`jax.distributed`).

A subcommand is a module of `jaxmu.commands` (``iam-matrix`` is ``jaxmu/commands/iam_matrix.py``)
that defines its absl flags and ``main(argv)``; only the chosen one is imported, so their flags
never meet.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Callable

from absl import flags

_DEFAULT_CACHE = os.environ.get("JAXMU_CACHE", str(Path.home() / ".cache" / "jaxmu" / "jax"))
_CACHE = flags.DEFINE_string(
    "compilation_cache", _DEFAULT_CACHE,
    "Directory of JAX's persistent compilation cache: a second run loads its compiled programs "
    "instead of compiling them again. Default $JAXMU_CACHE or ~/.cache/jaxmu/jax; '' turns it off.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() and detect the cluster (SLURM, Open MPI, ...) from the "
    "environment; implied by --coordinator_address.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for jax.distributed (multi-host runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (jax.distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
_DEBUG = flags.DEFINE_bool(
    "debug", False, "Show the Python traceback of an error (also JAXMU_DEBUG=1); without it a "
    "user's mistake is one `error: ...` line per problem.")

# Programs compiling faster than this are not worth a disk read (JAX's default is 1 s, which
# leaves most of the many small programs of a pipeline uncached).
CACHE_MIN_COMPILE_SECONDS = 0.1


def enable_compilation_cache(directory: str | os.PathLike | None) -> Path | None:
  """Turns on JAX's persistent compilation cache in ``directory`` (created); ``None``/"" leaves it
  off. Returns the directory used."""
  import jax
  if not directory:
    return None
  path = Path(directory).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """``jax.distributed.initialize`` with explicit values, or with none to detect the cluster from
  the environment (SLURM and other launchers JAX knows)."""
  import jax
  given = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in given) and any(v is None for v in given):
    raise ValueError("give all of --coordinator_address, --num_processes and --process_id, or "
                     "none of them (--distributed) to detect the cluster from the environment")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for `app.run(main, flags_parser=parse_flags)`.

  A config override naming a field that does not exist (``--config.trian.epochs=3``), a value
  of the wrong type, a missing or unknown flag exits with status 2 and a one-line message instead
  of a traceback. Then it enables the compilation cache (``--compilation_cache``) and, when asked,
  starts ``jax.distributed`` (``--distributed`` or ``--coordinator_address``/``--num_processes``/
  ``--process_id``).
  """
  try:
    rest = flags.FLAGS(argv)
    if _DISTRIBUTED.value or _COORDINATOR.value is not None:
      initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except (KeyError, AttributeError, TypeError, ValueError, flags.Error) as e:
    if _debug(argv):
      raise
    print(f"error: {flag_message(e)}; fix: see `{argv[0]} --help`", file=sys.stderr)
    sys.exit(2)
  enable_compilation_cache(_CACHE.value)
  return rest


def flag_message(error: BaseException) -> str:
  """One line for a flag-parsing error: a config file's own exception without the traceback
  config_flags wraps it in, an unknown config field as a sentence."""
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  match = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if match:  # ml_collections' message, often a repr with a literal \n
    return (f"unknown config field '{match.group(2)}'. Did you mean \"{match.group(1)}\" "
            f"instead of \"{match.group(2)}\"?")
  if isinstance(error, KeyError):
    return f"unknown key {one_line(text)}"
  if "Traceback (most recent call last)" in text:  # config_flags: the config file's exception
    head = text.split(":", 1)[0] if text.startswith("flag --") else ""
    last = [line for line in text.strip().splitlines() if line.strip()][-1].strip()
    text = f"{head}: {last}" if head else last
  return one_line(text)


def one_line(text: str) -> str:
  """``text`` with its line breaks as "; " (a message is one line)."""
  return "; ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def _debug(argv=()) -> bool:
  """--debug (in ``argv`` or parsed) or JAXMU_DEBUG=1: show tracebacks."""
  return ("--debug" in argv or os.environ.get("JAXMU_DEBUG", "") not in ("", "0")
          or (flags.FLAGS.is_parsed() and _DEBUG.value))


# The exceptions that are the user's mistakes: shown as `error: ...` lines without a traceback
# (`--debug` or JAXMU_DEBUG=1 shows it). OSError covers missing files, a file where a directory
# is needed, permissions and network failures.
USER_ERRORS = (ValueError, OSError, KeyError, IndexError, TypeError, EOFError)


def report_error(error: BaseException) -> int:
  """Prints ``error`` as one ``error: ...`` line per problem on stderr; returns the exit status
  (2: config, flags, work directory; 1: inputs and everything else)."""
  from absl import app

  from jaxmu import validate
  if isinstance(error, validate.UserError):
    lines, code = [str(p) for p in error.problems], error.exit_code
  elif isinstance(error, app.UsageError):
    lines, code = [str(error)], 2
  elif isinstance(error, KeyError):
    lines, code = [f"missing key {error.args[0]!r} (KeyError; --debug shows where)"
                   if error.args else "missing key"], 1
  elif isinstance(error, OSError) and error.filename is not None and error.strerror:
    lines, code = [f"{error.filename}: {error.strerror}"], 1
  elif isinstance(error, (IndexError, TypeError, EOFError)):  # more often a bug than a mistake
    lines, code = [f"{error} ({type(error).__name__}; --debug shows where)"], 1
  else:
    lines, code = [str(error) or type(error).__name__], 1
  for line in lines:
    print(f"error: {one_line(line)}", file=sys.stderr)
  return code


def guarded(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """``main`` with the user's mistakes (`USER_ERRORS`, `validate.UserError`, usage errors) turned
  into `report_error` lines and a non-zero exit, without a traceback unless debugging."""
  from absl import app

  def run(argv):
    try:
      return main(argv)
    except (app.UsageError, *USER_ERRORS) as e:
      if _debug():
        raise
      sys.exit(report_error(e))
    except KeyboardInterrupt:
      if _debug():
        raise
      print("error: interrupted; fix: run the same command again to resume (finished stages "
            "are kept, training continues from its last checkpoint)", file=sys.stderr)
      sys.exit(130)
  return run


def exit_on_problems(pipeline: str, config) -> None:
  """`jaxmu.validate` of ``config``: every problem on one line of stderr, then exit status 2."""
  from jaxmu import validate
  problems = validate.validate(pipeline, config)
  if problems:
    if _debug():
      raise validate.ConfigError(problems)
    sys.exit(report_error(validate.ConfigError(problems)))


def check_processes(pipeline: str) -> None:
  """Under ``jax.distributed`` with several processes, a `ConfigError` for the pipeline that does
  not run over them (``jaxmu iam-llm``)."""
  import jax
  if jax.process_count() > 1 and pipeline == "iam_llm":
    from jaxmu.errors import ConfigError, Problem
    raise ConfigError([Problem("--distributed", "jaxmu iam-llm runs in one process",
                               "run it without --distributed / --num_processes")])


def run_pipeline(pipeline: str, run: Callable[..., Path | None], config, workdir: str,
                 argv: list[str], **kwargs) -> None:
  """The body of a pipeline launcher's ``main``: refuses stray arguments, validates the config
  (`jaxmu.validate`: every problem on one line, then exit status 2, before any data loads or
  anything is written), quiets orbax (it logs every save and restore at INFO), runs
  ``run(config, workdir, **kwargs)`` and prints the report it returns."""
  import jax
  from absl import app, logging
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  exit_on_problems(pipeline, config)
  check_processes(pipeline)
  logging.set_verbosity(logging.WARNING)
  root = Path(workdir)
  existed = root.exists()
  config_json, owner_json = root / "config.json", root / "owner.json"
  before = config_json.read_bytes() if config_json.is_file() else None
  had_owner = owner_json.exists()
  try:
    path = run(config, workdir, **kwargs)
  except Exception:
    if jax.process_index():  # under jax.distributed process 0 alone writes the workdir
      raise
    if not existed:  # a new workdir where no stage finished: removed, as if never started
      _remove_unstarted(root)
    else:  # a failed run leaves the config.json (and owner) it found
      if before is not None and config_json.is_file() and config_json.read_bytes() != before:
        from jaxmu import stages
        with stages.atomic_write(config_json) as f:
          f.write(before)
      if not had_owner and before is not None:
        owner_json.unlink(missing_ok=True)
    raise
  if path is not None and path.suffix == ".md":
    print(path.read_text())
  print(f"Done: {path}")


def _remove_unstarted(root: Path) -> None:
  """Removes what a run that failed before finishing any stage wrote into the new workdir
  ``root`` (its config, owner, locks, empty temporaries); leaves anything else."""
  allowed = {"config.json", "owner.json", "stages", ".tmp"}
  if (not root.is_dir() or {p.name for p in root.iterdir()} - allowed
      or any(p.suffix != ".lock" for p in root.glob("stages/*")) or any(root.glob(".tmp/*"))):
    return
  for name in ("config.json", "owner.json"):
    (root / name).unlink(missing_ok=True)
  for lock in root.glob("stages/*.lock"):
    lock.unlink(missing_ok=True)
  for sub in ("stages", ".tmp", ""):
    try:
      (root / sub).rmdir()
    except OSError:
      pass


CONFIG_HELP = ("A shipped config by name, NAME[:args] (`jaxmu --help` lists them), or a config "
               "file's path[:args].")
_PACKAGE = Path(__file__).resolve().parent
COMMANDS_DIR = _PACKAGE / "commands"
CONFIGS_DIR = _PACKAGE / "configs"


def commands() -> dict[str, str]:
  """Subcommand name -> the first line of its module's docstring (read without importing it)."""
  found = {}
  for path in sorted(COMMANDS_DIR.glob("*.py")):
    if path.stem != "__init__":
      doc = ast.get_docstring(ast.parse(path.read_text())) or ""
      found[path.stem.replace("_", "-")] = doc.strip().splitlines()[0] if doc.strip() else ""
  return found


def config_names() -> list[str]:
  """The configs shipped in the package, addressable as ``--config=NAME[:args]``."""
  return sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if p.stem != "__init__")


def resolve_config(value: str) -> str:
  """``NAME[:args]`` of a shipped config -> ``<package>/configs/NAME.py[:args]``; a file path is
  returned as it is."""
  name, sep, args = value.partition(":")
  if "/" not in name and not name.endswith(".py") and (CONFIGS_DIR / f"{name}.py").is_file():
    return f"{CONFIGS_DIR / name}.py{sep}{args}"
  return value


def _resolve_config_flags(args: list[str]) -> list[str]:
  out, config_value_next = [], False
  for arg in args:
    if config_value_next:
      arg, config_value_next = resolve_config(arg), False
    elif arg == "--config":
      config_value_next = True
    elif arg.startswith("--config="):
      arg = "--config=" + resolve_config(arg[len("--config="):])
    out.append(arg)
  return out


def _config_values(args: list[str]) -> list[str]:
  values = [a[len("--config="):] for a in args if a.startswith("--config=")]
  return values + [b for a, b in zip(args, args[1:]) if a == "--config"]


def _usage() -> str:
  listed = "\n".join(f"  {name:<14} {doc}" for name, doc in commands().items())
  return (f"usage: jaxmu <command> [--flags]   (jaxmu <command> --help for its flags)\n\n"
          f"commands:\n{listed}\n\nshipped configs (--config=NAME[:args]): "
          f"{', '.join(config_names())}")


def _forget_other_commands(keep: str) -> None:
  """Unregisters the flags of the command modules imported before, other than ``keep``, so that
  several subcommands run in one process (tests) without their same-named flags meeting."""
  for name in [m for m in sys.modules if m.startswith("jaxmu.commands.") and m != keep]:
    for flag in list(flags.FLAGS.flags_by_module_dict().get(name, [])):
      if flag.name in flags.FLAGS:
        delattr(flags.FLAGS, flag.name)
    del sys.modules[name]
    package = sys.modules.get("jaxmu.commands")
    if package is not None and hasattr(package, name.rpartition(".")[2]):
      delattr(package, name.rpartition(".")[2])  # `from jaxmu.commands import x` imports anew


def main(argv: list[str] | None = None) -> None:
  """The `jaxmu` console script: ``argv[1]`` names the subcommand, the rest are its flags.

  A user's mistake (a config problem, a bad flag, file or work directory) exits non-zero with one
  ``error: ...`` line per problem on stderr and no traceback; ``--debug`` (or JAXMU_DEBUG=1)
  shows the traceback."""
  from absl import app
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in commands():
    print(f"error: unknown command {name!r}; one of: {', '.join(commands())}", file=sys.stderr)
    sys.exit(2)
  module_name = f"jaxmu.commands.{name.replace('-', '_')}"
  _forget_other_commands(module_name)
  flags.FLAGS.unparse_flags()  # a second command in this process starts from the defaults
  for stale in [f for f in flags.FLAGS if f.startswith("config.")]:  # overrides of the last
    delattr(flags.FLAGS, stale)  # config: config_flags defines them again for the new one
  module = importlib.import_module(module_name)
  if {"-h", "--help", "--helpshort"} & set(argv[2:]):  # absl's would list __main__'s flags only
    print(f"{module.__doc__.strip()}\n\nflags:\n{flags.FLAGS.module_help(module.__name__)}")
    sys.exit(0)
  app._register_and_parse_flags_with_usage.done = False  # app.run once per command, not process
  command_argv = [f"jaxmu {name}", *_resolve_config_flags(argv[2:])]
  for value in _config_values(command_argv):
    if not Path(value.partition(":")[0]).expanduser().is_file():
      print(f"error: --config: {value.partition(':')[0]!r} is neither a shipped config nor a "
            f"file; fix: use one of {', '.join(config_names())} (NAME[:args]) or a config "
            "file's path", file=sys.stderr)
      sys.exit(2)
  saved, sys.argv = sys.argv, command_argv  # config_flags reads its overrides from sys.argv
  try:
    app.run(guarded(module.main), argv=command_argv, flags_parser=parse_flags)
  finally:
    sys.argv = saved
