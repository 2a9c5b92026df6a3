"""Alias of `jaxmu ulira` for a checkout (`jaxmu ulira --help` lists its flags)."""

import sys

from jaxmu import cli

if __name__ == "__main__":
  cli.main(["jaxmu", "ulira", *sys.argv[1:]])
