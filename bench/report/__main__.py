"""`python -m bench.report`: see bench/report/cli.py."""
import sys

from bench.report.cli import main

sys.exit(main())
