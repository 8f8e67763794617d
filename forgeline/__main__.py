"""`python -m forgeline ...`: the forgeline command (forgeline/cli.py)."""
import sys

from forgeline.cli import main

sys.exit(main())
