"""What every launcher shares: flag parsing that turns config mistakes into one clear line."""

from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for `app.run(main, flags_parser=parse_flags)`.

  A config override naming a field that does not exist (``--config.trian.epochs=3``) or a value
  of the wrong type exits with status 2 and a one-line message instead of a traceback.
  """
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError, TypeError, ValueError, flags.Error) as e:
    message = f"unknown config field {e.args[0]}" if isinstance(e, KeyError) and e.args else str(e)
    print(f"error: {message}".replace("\n", " "), file=sys.stderr)
    print(f"usage: {argv[0]} --config=configs/<file>.py[:args] --workdir=DIR "
          "[--config.<field>=<value> ...]", file=sys.stderr)
    sys.exit(2)
