"""U-LiRA alone over a workdir (jaxmu/configs/ulira.py): the sub-stages of `ulira_stage` with each
method's hyper-parameters from a finished DeepUnlearn search (``config.search_dir``) or its
defaults. Within a DeepUnlearn run, U-LiRA is that pipeline's ``ulira`` stage instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from jaxmu import methods as methods_lib
from jaxmu import errors, search, stages, validate
from jaxmu.pipelines import common, ulira_stage


def best_hparams(config: ml_collections.ConfigDict, method: str) -> tuple[dict, str]:
  """A method's hyper-parameters and where they come from ("search" or "defaults").

  With ``config.search_dir`` set, the best trial of the main search (``jaxmu.search.load_best``)
  overrides ``config.unlearn.<method>``; a method without a search result keeps its defaults,
  and the report says so.
  """
  if not config.search_dir:
    return common.method_hparams(config, method), "defaults"
  directory = Path(config.search_dir)
  if not directory.is_dir():
    raise FileNotFoundError(f"search_dir {directory} does not exist: give the main run's "
                            "<workdir>/search, or --config.search_dir='' for the defaults")
  best = search.load_best(directory, method)
  if best is None:
    return common.method_hparams(config, method), "defaults"
  return common.method_hparams(config, method, best.best_params), "search"


def _claim(workdir: str | Path) -> stages.Workdir:
  """``workdir`` claimed for U-LiRA before any data loads: `stages.Workdir.claim` refuses another
  pipeline's run; a config.json that no pipeline wrote (claim takes it for a new workdir and
  would replace it) is refused here."""
  path = Path(workdir) / "config.json"
  try:
    owner = stages.pipeline_of(json.loads(path.read_text())) if path.is_file() else "new"
  except json.JSONDecodeError:
    owner = None
  if owner is None:
    raise errors.WorkdirError([errors.Problem(
        "--workdir", f"{workdir} holds another pipeline's run ({path} is no jaxmu pipeline's)",
        f"give U-LiRA its own directory, e.g. --workdir={Path(workdir) / 'ulira'}")])
  wd = stages.Workdir(workdir)
  wd.claim("ulira")
  return wd


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
  """Runs (or resumes) every stage up to ``config.stop_after``; returns the last output's path.
  A config that `jaxmu.validate` finds wrong raises its `ConfigError`, and another pipeline's
  workdir (`stages.Workdir.claim`) its `WorkdirError`, before any data loads."""
  validate.check("ulira", config)
  wd = _claim(workdir)
  methods = tuple(methods_lib.get(m).name for m in config.ulira.methods)
  hparams = {m: best_hparams(config, m) for m in methods}
  return ulira_stage.run(config, wd, common.load_dataset(config.dataset),
                         common.strategy(config), hparams, config.stop_after)
