"""`python -m lorakit ...`, the same as the `lorakit` command; also what `torchrun -m lorakit` launches."""

import sys

from lorakit.cli import main

if __name__ == "__main__":
    sys.exit(main())
