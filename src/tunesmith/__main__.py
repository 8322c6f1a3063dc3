"""`python -m tunesmith ...`: the same as the `tunesmith` command (what torchrun's `-m` starts)."""
import sys

from tunesmith.cli import main

sys.exit(main())
