"""Console entry points."""
from __future__ import annotations

import sys


def train_main(argv: list[str] | None = None) -> int:
    """``cbd-train``: continual training with CBD. The training loop is not part of this release yet."""
    del argv
    print("cbd-train: training is not built yet in this version of cbd_fast; the kernels "
          "(cbd_fast.banzhaf_interaction, cbd_fast.maxsim) are available.", file=sys.stderr)
    return 2


def train_console() -> None:
    sys.exit(train_main(sys.argv[1:]))


if __name__ == "__main__":
    train_console()
