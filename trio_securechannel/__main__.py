"""``python -m trio_securechannel``: the command line (needs the ``cli`` extra)."""

from trio_securechannel._cli import run

run()
