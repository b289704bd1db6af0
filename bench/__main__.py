"""``python -m bench``: time every method against its peer library and against the limit."""

import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars from peers

from bench.harness import main  # noqa: E402

sys.exit(main())
