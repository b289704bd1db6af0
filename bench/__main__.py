"""``python -m bench``: time every method against its peer library and against the limit."""

import sys

from bench.harness import main

sys.exit(main())
