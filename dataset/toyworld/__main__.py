"""`python -m dataset.toyworld`: write a toy world (see dataset/toyworld/cli.py)."""
import sys

from dataset.toyworld.cli import main

sys.exit(main())
