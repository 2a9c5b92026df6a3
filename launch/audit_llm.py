"""Alias of `jaxmu audit-llm` for a checkout (`jaxmu audit-llm --help` lists its flags)."""

import sys

from jaxmu import cli

if __name__ == "__main__":
  cli.main(["jaxmu", "audit-llm", *sys.argv[1:]])
