"""Alias of `jaxmu plan` for a checkout (`jaxmu plan --help` lists its flags)."""

import sys

from jaxmu import cli

if __name__ == "__main__":
  cli.main(["jaxmu", "plan", *sys.argv[1:]])
