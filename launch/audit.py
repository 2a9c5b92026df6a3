"""Alias of `jaxmu audit` for a checkout (`jaxmu audit --help` lists its flags)."""

import sys

from jaxmu import cli

if __name__ == "__main__":
  cli.main(["jaxmu", "audit", *sys.argv[1:]])
