"""The two kinds of error the command-line tools report as a message alone, without a traceback.

:class:`InputError`: what the user gave is wrong — a config key, a command-line flag, a data, image or checkpoint
file (exit status 2). :class:`RunFailed`: the run itself stopped for a reason its message explains, such as a
non-finite loss (exit status 1). Other exceptions are bugs and keep their traceback. Imports nothing heavy.
"""


class InputError(Exception):
    """Something the user gave cannot be used; the message names it and what was expected."""


class RunFailed(Exception):
    """A run stopped; the message says why, where, and what was kept."""
