"""Alias of `jaxmu prepare-data` for a checkout (`jaxmu prepare-data --help` lists its flags)."""

import sys

from jaxmu import cli

if __name__ == "__main__":
  cli.main(["jaxmu", "prepare-data", *sys.argv[1:]])
