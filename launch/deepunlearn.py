"""Alias of `jaxmu deepunlearn` for a checkout (`jaxmu deepunlearn --help` lists its flags)."""

import sys

from jaxmu import cli

if __name__ == "__main__":
  cli.main(["jaxmu", "deepunlearn", *sys.argv[1:]])
