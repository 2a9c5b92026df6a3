"""Alias of `jaxmu benchmark` for a checkout (`jaxmu benchmark --help` lists its flags)."""

import sys

from jaxmu import cli

if __name__ == "__main__":
  cli.main(["jaxmu", "benchmark", *sys.argv[1:]])
