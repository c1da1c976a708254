"""`python -m park.cli`: the `park` command."""
import sys

from park.cli.app import main

sys.exit(main())
