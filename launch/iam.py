"""Alias of `jaxmu iam` for a checkout (`jaxmu iam --help` lists its flags)."""

import sys

from jaxmu import cli

if __name__ == "__main__":
  cli.main(["jaxmu", "iam", *sys.argv[1:]])
