"""``python -m bench``: run the benchmark suite."""

import sys

from bench.harness import main

sys.exit(main())
