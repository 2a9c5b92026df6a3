"""Alias of `jaxmu iam-matrix` for a checkout (`jaxmu iam-matrix --help` lists its flags)."""

import sys

from jaxmu import cli

if __name__ == "__main__":
  cli.main(["jaxmu", "iam-matrix", *sys.argv[1:]])
