"""`python -m park_agent` is `park-agent`."""
import sys

from park_agent.cli import main

sys.exit(main())
