"""The typed errors of a user's mistakes and their one-line format.

Every problem is one line, ``<field or file>: <what>; fix: <fix>`` (`Problem`). A `UserError`
holds one or more; `jaxmu.cli` prints each as ``error: <line>`` on stderr and exits non-zero
without a traceback (``--debug`` or JAXMU_DEBUG=1 shows it). They are ValueErrors, so code that
catches ValueError keeps working. `jaxmu.validate` re-exports them.
"""

from __future__ import annotations

from typing import NamedTuple


class Problem(NamedTuple):
  field: str
  what: str
  fix: str

  def __str__(self):
    return f"{self.field}: {self.what}; fix: {self.fix}"


class UserError(ValueError):
  """A mistake of the user's (a config, a flag, an input file, a work directory), not a bug: its
  message is one line per problem, ``<field or file>: <what>; fix: <fix>``. `jaxmu.cli` prints
  each line as ``error: ...`` on stderr and exits non-zero without a traceback."""

  exit_code = 1

  def __init__(self, problems):
    self.problems = [problems] if isinstance(problems, (str, Problem)) else list(problems)
    super().__init__("\n".join(map(str, self.problems)))


class ConfigError(UserError):
  """The problems of a config; its message is one line per problem."""

  exit_code = 2


class InputError(UserError):
  """A bad input: a data or audit file, an array, a flag's value; `problem` builds one."""


class WorkdirError(UserError):
  """A work directory that this run must not use (another pipeline's, a file)."""

  exit_code = 2


def problem(field: str, what: str, fix: str) -> InputError:
  """An `InputError` of one problem (``field: what; fix: fix``)."""
  return InputError([Problem(field, what, fix)])
