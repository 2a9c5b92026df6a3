"""Alias of `jaxmu iam-llm` for a checkout (`jaxmu iam-llm --help` lists its flags)."""

import sys

from jaxmu import cli

if __name__ == "__main__":
  cli.main(["jaxmu", "iam-llm", *sys.argv[1:]])
