"""A pipeline's config checked before anything runs: no data is loaded and nothing is written.

``validate(pipeline, config)`` lists every problem (the field, what is wrong, the fix);
`check` raises them as one `ConfigError`. Every launcher (`jaxmu.cli.run_pipeline`) and every
pipeline's ``run`` call it first, so each rule lives here once. Sizes come from the dataset's
known metadata (`jaxmu.data.sources.KNOWN`), so a config is checked before its data is prepared;
a dataset without metadata (npz) skips the size checks.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

from jaxmu import errors
from jaxmu import methods as methods_lib
from jaxmu import models, search
from jaxmu.attacks.audit import ATTACKS
from jaxmu.data import sources

PIPELINES = ("deepunlearn", "ulira", "iam", "iam_llm")
SETTINGS = ("exact", "arch", "shifted", "incremental")  # iam-spec 7.1-7.4
FORGET_TYPES = ("set_random", "class_percentage", "one_class")
# DeepUnlearn's reference models (`jaxmu.pipelines.deepunlearn.GROUPS`): its rows in every run,
# so not methods of ``config.methods`` (U-LiRA's ``ulira.methods`` may name ``original``).
REFERENCE_GROUPS = ("original", "retrain")


# The typed errors (`jaxmu.errors`) and the problem format, re-exported here.
Problem, UserError, ConfigError, InputError, WorkdirError, problem = (
    errors.Problem, errors.UserError, errors.ConfigError, errors.InputError, errors.WorkdirError,
    errors.problem)


def validate(pipeline: str, config) -> list[Problem]:
  """Every problem of ``config`` for ``pipeline`` (one of `PIPELINES`); [] when it can run."""
  if pipeline not in PIPELINES:
    raise ValueError(f"unknown pipeline {pipeline!r}; known: {', '.join(PIPELINES)}")
  out = []
  if pipeline == "iam_llm":  # no image dataset or model registry entry: its own rules
    _iam_llm(config, out)
    return out
  meta = _common(config, out)
  if pipeline != "iam":
    _hparams(out, "unlearn", config.unlearn)
  if pipeline == "deepunlearn":
    _deepunlearn(config, meta, out)
  elif pipeline == "ulira":
    _ulira(config, meta, out)
    _search_dir(config, out)
  else:
    _iam(config, meta, out)
  return out


def check(pipeline: str, config) -> None:
  """`validate`, raising the problems as one `ConfigError`."""
  problems = validate(pipeline, config)
  if problems:
    raise ConfigError(problems)


# ---------------------------------------------------------------- shared rules


def _at_least(out, field, value, low, fix=None):
  if value < low:
    out.append(Problem(field, f"{value} is below {low}", fix or f"set {field} >= {low}"))


def _ratio(out, field, value, closed_right=False):
  if not (0 < value <= 1 if closed_right else 0 < value < 1):
    out.append(Problem(field, f"{value} is outside (0, 1{']' if closed_right else ')'}",
                       f"give a fraction, e.g. {field}=0.1"))


def _names(out, field, names, known, what, allow_empty=True):
  """Unknown or repeated names of a list; returns the known ones, canonical."""
  if not names and not allow_empty:
    out.append(Problem(field, "is empty", f"name at least one {what}"))
  seen = []
  for name in names:
    canonical = known(name)
    if canonical is None:
      out.append(Problem(field, f"unknown {what} {name!r}", f"use one of {_known_text(what)}"))
    elif canonical in seen:
      out.append(Problem(field, f"{what} {name!r} appears twice", "list it once"))
    else:
      seen.append(canonical)
  return seen


def _references(out, field, methods, references):
  """The methods of a list that are references the run evaluates anyway (their rows would be
  doubled or replaced)."""
  for name in [m for m in methods if m in references]:
    out.append(Problem(field, f"{name!r} is a reference every run evaluates, not a method to run",
                       f"drop {name!r} from {field}"))


def _known_text(what):
  return ", ".join(sorted(methods_lib.METHODS) if what == "method" else ATTACKS)


def _method(name):
  try:
    return methods_lib.get(name).name
  except ValueError:
    return None


def _hparams(out, section, overrides):
  """``section`` = {method: hyper-parameters}: known methods with known hyper-parameter keys."""
  for name, hparams in overrides.items():
    field = f"{section}.{name}"
    if _method(name) is None:
      out.append(Problem(field, f"unknown method {name!r}", f"use one of {_known_text('method')}"))
      continue
    try:
      methods_lib.get(name).hparams(dict(hparams))
    except ValueError as e:
      out.append(Problem(field, str(e), "drop that key or use a known one"))
      continue
    _hparam_values(out, field, dict(methods_lib.get(name).defaults), dict(hparams))


def _hparam_values(out, field, defaults, hparams):
  """Epoch counts and batch sizes are whole numbers >= 1 (>= 0 where the default is 0: the
  method's own choice); learning rates are finite and >= 0."""
  for key, value in hparams.items():
    values = value if isinstance(value, (list, tuple)) else [value]
    if key.endswith(("epochs", "batch_size", "steps")) or key == "batches":
      low = 0 if not defaults.get(key, 1) else 1
      bad = [v for v in values if not isinstance(v, (int, float)) or isinstance(v, bool)
             or not math.isfinite(v) or v < low or (key.endswith("batch_size") and v != int(v))]
      if bad:
        out.append(Problem(f"{field}.{key}", f"{value!r} is not a count >= {low}",
                           f"set {field}.{key} >= {max(low, 1)}"))
    elif key.endswith("learning_rate"):
      bad = [v for v in values if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0]
      if bad:
        out.append(Problem(f"{field}.{key}", f"{value!r} is not a finite rate >= 0",
                           f"give a small positive rate, e.g. {field}.{key}=0.01"))


def _common(config, out) -> sources.Metadata | None:
  """Dataset, model, training lengths and batch size; returns the dataset's metadata."""
  meta = _dataset(out, "dataset", config.dataset)
  if config.model.name not in models.NAMES:
    out.append(Problem("model.name", f"unknown model {config.model.name!r}",
                       f"use one of {', '.join(models.NAMES)}"))
  _at_least(out, "train.epochs", config.train.epochs, 1)
  _at_least(out, "train.batch_size", config.train.batch_size, 1)
  _at_least(out, "checkpoint_every", config.checkpoint_every, 1)
  return meta


def _dataset(out, field, spec) -> sources.Metadata | None:
  if spec.name not in sources._SOURCES:
    out.append(Problem(f"{field}.name", f"unknown dataset {spec.name!r}",
                       f"use one of {', '.join(sorted(sources._SOURCES))}"))
    return None
  options = spec.options.to_dict()
  accepted = inspect.signature(sources._SOURCES[spec.name]).parameters
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    out.append(Problem(f"{field}.options", f"dataset {spec.name!r} takes no option(s) {unknown}",
                       f"use {', '.join(k for k in accepted if k != 'data_dir') or 'none'}"))
    return None
  return sources.metadata(spec.name, **options)


def _seeds(out, config):
  seeds = tuple(config.seeds)
  if not seeds:
    out.append(Problem("seeds", "is empty", "give at least one seed, e.g. (0,)"))
  if len(set(seeds)) != len(seeds):
    out.append(Problem("seeds", f"{seeds} repeats a seed", "list each seed once"))
  return seeds


# ---------------------------------------------------------------- pipelines


def _deepunlearn(config, meta, out):
  s = config.split
  _ratio(out, "split.val_ratio", s.val_ratio)
  _ratio(out, "split.forget_ratio", s.forget_ratio)
  seeds = _seeds(out, config)
  methods = _names(out, "methods", config.methods, _method, "method", allow_empty=False)
  _references(out, "methods", methods, REFERENCE_GROUPS)
  tuned = _names(out, "search.methods", config.search.methods, _method, "method")
  if any(m in methods for m in tuned):
    missing = [x for x in config.search.seeds if x not in seeds]
    if missing or not config.search.seeds:
      out.append(Problem("search.seeds", f"{tuple(config.search.seeds)} must be a non-empty "
                         f"subset of seeds={seeds} (missing {missing})",
                         "add them to seeds or change search.seeds"))
  _at_least(out, "search.trials", config.search.trials, 1)
  _at_least(out, "search.tpe_startup_trials", config.search.tpe_startup_trials, 0)
  if config.search.mode not in ("nsga3", "tpe"):
    out.append(Problem("search.mode", f"unknown mode {config.search.mode!r}", "use nsga3 or tpe"))
  _ratio(out, "search.epoch_fraction", config.search.epoch_fraction, closed_right=True)
  if meta and 0 < s.val_ratio < 1 and 0 < s.forget_ratio < 1:
    train = meta.num_train - math.ceil(meta.num_train * s.val_ratio)  # sklearn's test_size
    retain = train - math.ceil(train * s.forget_ratio)
    if min(train - retain, retain, meta.num_train - train) < 1:
      out.append(Problem("split", f"{meta.num_train} training samples leave an empty retain, "
                         "forget or val set", "change split.val_ratio or split.forget_ratio"))
    elif config.train.batch_size > retain:
      out.append(Problem("train.batch_size", f"{config.train.batch_size} exceeds the retain set "
                         f"({retain} samples)", f"set train.batch_size <= {retain}"))
  if config.ulira.enabled:
    _ulira(config, meta, out)


def _ulira(config, meta, out):
  u = config.ulira
  _names(out, "ulira.methods", u.methods, _method, "method", allow_empty=False)
  _at_least(out, "ulira.epochs", u.epochs, 1)
  _at_least(out, "ulira.lira.num_splits", u.lira.num_splits, 1)
  _at_least(out, "ulira.lira.num_forget_draws", u.lira.num_forget_draws, 1)
  _at_least(out, "ulira.signal_batch_models", u.signal_batch_models, 1)
  _at_least(out, "ulira.max_models_per_program", u.max_models_per_program, 0)
  _ratio(out, "ulira.lira.val_ratio", u.lira.val_ratio)
  _ratio(out, "ulira.lira.forget_ratio", u.lira.forget_ratio)
  if u.lira.scheme not in ("deepunlearn", "balanced"):
    out.append(Problem("ulira.lira.scheme", f"unknown scheme {u.lira.scheme!r}",
                       "use deepunlearn or balanced"))
  elif u.lira.scheme == "balanced" and u.lira.num_splits % 2:
    out.append(Problem("ulira.lira.num_splits", f"{u.lira.num_splits} is odd; scheme='balanced' "
                       "puts every sample IN half the splits", "give an even number"))
  if meta and 0 < u.lira.val_ratio < 1:
    n_val = int(meta.num_train * u.lira.val_ratio)
    ins = (meta.num_train - n_val) // 2  # a split's IN samples (about, for scheme='balanced')
    if not 1 <= n_val <= meta.num_train - 2:
      out.append(Problem("ulira.lira.val_ratio", f"leaves {n_val} of {meta.num_train} training "
                         "samples for val", "give val at least 1 and the splits at least 2"))
    elif 0 < u.lira.forget_ratio < 1 and int(ins * u.lira.forget_ratio) < 1:
      out.append(Problem("ulira.lira.forget_ratio", f"{u.lira.forget_ratio} of a split's {ins} "
                         "IN samples forgets none (floor)",
                         f"set ulira.lira.forget_ratio >= {1 / ins:.3g}"))


def _search_dir(config, out):
  """U-LiRA alone: ``search_dir`` is "" (defaults) or a finished search's directory."""
  if not config.search_dir:
    return
  directory = Path(config.search_dir)
  fix = "give the main run's <workdir>/search, or '' for the defaults"
  if not directory.is_dir():
    out.append(Problem("search_dir", f"{directory} is not a directory", fix))
    return
  if (directory / "search").is_dir() and (directory / "stages").is_dir():
    out.append(Problem("search_dir", f"{directory} is a DeepUnlearn work directory, not its "
                       "search", f"give --config.search_dir={directory / 'search'}"))
    return
  tunable = [m for m in {_method(m) for m in config.ulira.methods} - {None}
             if methods_lib.get(m).space]
  found = []
  for method in tunable:
    try:
      found += [method] if search.load_best(directory, method) else []
    except (ValueError, json.JSONDecodeError) as e:
      out.append(Problem("search_dir", str(e).split(";")[0], "delete it and run the search again"))
  if tunable and not found:
    out.append(Problem("search_dir", f"{directory} holds no search result (<method>.json) of "
                       f"{', '.join(sorted(tunable))}", fix))


def _iam(config, meta, out):
  s, k = config.split, config.num_shadows
  _seeds(out, config)
  value = s.forget
  types = tuple(value.split("+")) if isinstance(value, str) else tuple(value)
  if not types or set(types) - set(FORGET_TYPES) or len(set(types)) != len(types):
    out.append(Problem("split.forget", f"{value!r} is not distinct unlearning types",
                       f"join distinct types of {', '.join(FORGET_TYPES)} by '+'"))
  if set(types) & {"class_percentage", "one_class"}:
    classes = tuple(s.forget_classes)
    bad = [c for c in classes if meta and not 0 <= c < meta.num_classes]
    if not classes or bad or len(set(classes)) != len(classes):
      top = meta.num_classes - 1 if meta else "C-1"
      out.append(Problem("split.forget_classes", f"{classes} must be distinct classes in 0..{top}",
                         "list each class to forget once, none outside the dataset's"))
  _ratio(out, "split.class_ratio", s.class_ratio, closed_right=True)
  _ratio(out, "split.shadow_train_frac", s.shadow_train_frac)
  _at_least(out, "split.val_cap", s.val_cap, 1)
  _at_least(out, "num_shadows", k, 1)
  # incremental: 0 target epochs audit the base run's models as they are
  _at_least(out, "train.target_epochs", config.train.target_epochs,
            0 if config.setting == "incremental" else 1)
  _at_least(out, "ref_in.epochs", config.ref_in.epochs, 1)
  _at_least(out, "ref_in.batch_size", config.ref_in.batch_size, 1)
  sweep = tuple(config.audit.k_sweep)
  if sweep and (min(sweep) < 1 or max(sweep) > k):
    out.append(Problem("audit.k_sweep", f"{sweep} leaves 1..num_shadows={k}",
                       f"give K values in 1..{k}, or () for 1, 2, 4, ... <= num_shadows"))
  _at_least(out, "audit.max_groups", config.audit.max_groups, 1)
  for field in ("off_eps", "norm_eps"):  # the Gumbel map's (eps1, eps2), iam-spec 2
    eps = tuple(config.audit[field])
    if len(eps) != 2 or not all(isinstance(e, (int, float)) and e > 0 for e in eps):
      out.append(Problem(f"audit.{field}", f"{eps} is not a pair of positive numbers",
                         f"give (eps1, eps2), e.g. audit.{field}=(0.01, 1e-5)"))
  _names(out, "audit.attacks", config.audit.attacks, lambda a: a if a in ATTACKS else None,
         "attack", allow_empty=False)
  _score_ui(config, out)
  approx = _names(out, "approx.methods", config.approx.methods, _method, "method")
  _references(out, "approx.methods", approx, ("retrain",))  # Table 8's reference row
  _hparams(out, "approx.hparams", config.approx.hparams)
  _setting(config, meta, out)


def _score_ui(config, out):
  u, k = config.score_ui, config.num_shadows
  if not 0 <= u.start_models <= k:
    out.append(Problem("score_ui.start_models", f"{u.start_models} is not in 0..num_shadows={k}",
                       "ScoreUI continues shadows 0..start_models-1: lower it (0 skips ScoreUI)"))
  if not u.start_models:
    return
  _names(out, "score_ui.attacks", u.attacks, lambda a: a if a in ATTACKS else None, "attack")
  _at_least(out, "score_ui.breaks", u.breaks, 1)
  if u.breaks >= 1 and u.epochs < u.breaks:
    out.append(Problem("score_ui.epochs", f"{u.epochs} is below breaks={u.breaks}: break b is "
                       "the state after b * (epochs // breaks) epochs",
                       f"set score_ui.epochs >= {u.breaks} or lower score_ui.breaks"))


def _iam_llm(config, out):
  """`jaxmu.pipelines.iam_llm`: a known corpus with its inputs, positive sizes, the checkpoints
  of the ``files`` corpus (config.json each, a tokenizer.json)."""
  c, s = config.corpus, config.split
  if c.name not in ("pydoc_topics", "files"):
    out.append(Problem("corpus.name", f"unknown corpus {c.name!r}", "use pydoc_topics or files"))
  _at_least(out, "corpus.chunk_len", c.chunk_len, 2)
  counts = {"split.runs": s.runs, "split.forget": s.forget, "split.retain_query": s.retain_query,
            "train.epochs": config.train.epochs, "train.batch_size": config.train.batch_size,
            "signals.batch_size": config.signals.batch_size, "audit.rounds": config.audit.rounds,
            "checkpoint_every": config.checkpoint_every}
  for field, value in counts.items():
    _at_least(out, field, value, 1)
  if c.name == "pydoc_topics":
    _at_least(out, "split.out", s.out, 1, "the OUT LM needs its own chunks: set split.out >= 1")
    _at_least(out, "corpus.vocab_size", c.vocab_size, 260, "a byte-level BPE needs >= 260 tokens")
    used = [f for f in ("target_dir", "fit_dir", "ref_dir") if config.models[f]]
    if used:
      out.append(Problem(f"models.{used[0]}", "is set, but corpus.name='pydoc_topics' trains its "
                         "own LMs", "set corpus.name=files (config iam_llm:hf) or clear it"))
  if c.name != "files":
    return
  for field in ("forget_file", "retain_file", "population_file"):
    path = c[field]
    if (path or field != "population_file") and not Path(path or ".").is_file():
      out.append(Problem(f"corpus.{field}", f"{path!r} is not a file", "give the text file"))
  for field in ("target_dir", "fit_dir", "ref_dir"):
    path = Path(config.models[field] or "missing") / "config.json"
    if not path.is_file():
      out.append(Problem(f"models.{field}", f"{config.models[field]!r} has no config.json",
                         "give a Hugging Face checkpoint directory"))
  tokenizer = config.models.tokenizer_dir or config.models.target_dir
  if not (Path(tokenizer or "missing") / "tokenizer.json").is_file():
    out.append(Problem("models.tokenizer_dir", f"no tokenizer.json in {tokenizer!r} (default: "
                       "models.target_dir)", "give the directory of the checkpoints' "
                       "tokenizer.json"))
  if config.models.dtype not in ("float32", "bfloat16"):
    out.append(Problem("models.dtype", f"{config.models.dtype!r}", "use float32 or bfloat16"))


def _finished_run(out, field, root):
  """The config of the finished IAM run at ``root`` (None after a problem)."""
  path = Path(root) / "config.json"
  config = json.loads(path.read_text()) if path.is_file() else {}
  if "num_shadows" not in config:
    out.append(Problem(field, f"{root!r} holds no IAM run (no IAM config.json)",
                       "point it at a finished run of jaxmu iam"))
    return None
  return config


def _setting(config, meta, out):
  """The setting and what it combines with: shifted shadows, incremental base, reused models."""
  setting, s = config.setting, config.split
  if setting not in SETTINGS:
    out.append(Problem("setting", f"unknown setting {setting!r}",
                       f"use one of {', '.join(SETTINGS)}"))
  unused = {"shadow_model.name": (config.shadow_model.name, "arch"),
            "shadow_dataset.name": (config.shadow_dataset.name, "shifted"),
            "incremental.base_workdir": (config.incremental.base_workdir, "incremental")}
  for field, (value, needs) in unused.items():
    if value and setting != needs:
      out.append(Problem(field, f"is set, but only setting={needs!r} uses it",
                         f"set setting={needs} or clear {field}"))
  shadow_model = config.shadow_model.name
  if setting == "arch" and shadow_model and shadow_model not in models.NAMES:
    out.append(Problem("shadow_model.name", f"unknown model {shadow_model!r}",
                       f"use one of {', '.join(models.NAMES)}"))
  shadow_meta = None
  if setting == "shifted":
    if not config.shadow_dataset.name:
      out.append(Problem("shadow_dataset.name", "setting='shifted' needs the shadows' dataset",
                         "name it, e.g. cinic10 for cifar10 targets"))
    else:
      shadow_meta = _dataset(out, "shadow_dataset", config.shadow_dataset)
  reused = {kind: config.reuse[kind] for kind in ("shadows", "targets") if config.reuse[kind]}
  if setting == "incremental":
    if reused:
      out.append(Problem("reuse", "setting='incremental' takes its models from "
                         "incremental.base_workdir", "leave reuse.shadows and reuse.targets empty"))
    if not config.incremental.base_workdir:
      out.append(Problem("incremental.base_workdir", "setting='incremental' continues a finished "
                         "run's models", "give that run's workdir (e.g. a cifar10 run)"))
    else:
      base = _finished_run(out, "incremental.base_workdir", config.incremental.base_workdir)
      if base and base["model"]["name"] != config.model.name:
        out.append(Problem("incremental.base_workdir", f"its model {base['model']['name']!r} "
                           f"differs from model.name={config.model.name!r}",
                           "use the base run's model: incremental continues its models"))
  for kind, root in reused.items():
    run = _finished_run(out, f"reuse.{kind}", root)
    if run and kind == "shadows" and run["num_shadows"] < config.num_shadows:
      out.append(Problem("reuse.shadows", f"{root!r} has {run['num_shadows']} shadows, "
                         f"num_shadows={config.num_shadows} asks for more",
                         f"set num_shadows <= {run['num_shadows']}"))
  if meta:
    _iam_sizes(config, meta, out)
  if shadow_meta:
    _shadow_sizes(out, "shadow_dataset.shadow_size", config.shadow_dataset.shadow_size,
                  shadow_meta.num_train, s)


def _iam_sizes(config, meta, out):
  """The pools and splits of `jaxmu.data.splits.iam` against the dataset's size."""
  s, incremental = config.split, config.setting == "incremental"
  train, held_out = meta.num_train, meta.num_test
  if not held_out:
    _ratio(out, "split.holdout_ratio", s.holdout_ratio)
    train = int((1 - s.holdout_ratio) * meta.num_train)
    held_out = meta.num_train - train
  if held_out < 2:
    out.append(Problem("split.holdout_ratio", f"leaves {held_out} held-out samples for the test "
                       "and val (population) sets", "hold out at least 2 samples"))
  if incremental:  # the rest of the training part is the (unused) shadow pool
    field, shadow_size = "incremental.pool_size", train - config.incremental.pool_size
  else:
    field, shadow_size = "split.shadow_size", s.shadow_size
  if not _shadow_sizes(out, field, shadow_size, train, s):
    return
  pool = train - shadow_size
  if "set_random" in str(s.forget):
    if not 1 <= s.forget_size <= pool:
      out.append(Problem("split.forget_size", f"{s.forget_size} is not in 1..{pool} (the pool)",
                         f"set split.forget_size <= {pool}"))
    elif not 0 <= s.fixed_forget <= s.forget_size:
      out.append(Problem("split.fixed_forget", f"{s.fixed_forget} is not in 0..forget_size",
                         f"set split.fixed_forget <= {s.forget_size}"))
  if config.train.batch_size > pool:
    out.append(Problem("train.batch_size", f"{config.train.batch_size} exceeds the pool ({pool})",
                       f"set train.batch_size <= {pool}"))


def _shadow_sizes(out, field, size, available, s) -> bool:
  """A shadow pool of ``size`` samples fits ``available`` and leaves each shadow a train part
  beyond the ``shadow_fix`` fixed samples and a held-out part; False after a problem."""
  if not 1 <= size <= available - 1:
    out.append(Problem(field, f"gives a shadow pool of {size} of {available} training samples",
                       "keep both the shadow pool and the target pool non-empty"))
    return False
  train = int(s.shadow_train_frac * size)
  if not 0 <= s.shadow_fix <= train or train >= size:
    out.append(Problem("split.shadow_fix", f"{s.shadow_fix} fixed samples do not fit each "
                       f"shadow's {train} training samples of a {size}-sample pool",
                       "lower split.shadow_fix or change split.shadow_train_frac"))
    return False
  return True
