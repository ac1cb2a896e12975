"""``torchrun ... tests/dist_runner.py train --config F``: the CLI, with an optional injected failure (tests only).

``DREAMBOOTH_TEST_FAIL_RANK`` / ``DREAMBOOTH_TEST_FAIL_AFTER``: the process of that rank raises once it has computed
that many losses, as a crash in one process would.  ``DREAMBOOTH_TEST_BUCKET_BYTES``: a smaller gradient bucket, so
that even the tiny model's gradients are exchanged in several buckets.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth.cli import main
from dreambooth.train import distributed, loop

if "DREAMBOOTH_TEST_BUCKET_BYTES" in os.environ:
    distributed.BUCKET_BYTES = int(os.environ["DREAMBOOTH_TEST_BUCKET_BYTES"])

fail_rank = int(os.environ.get("DREAMBOOTH_TEST_FAIL_RANK", "-1"))
if int(os.environ.get("RANK", "0")) == fail_rank:
    limit = int(os.environ.get("DREAMBOOTH_TEST_FAIL_AFTER", "0"))
    original = loop.Trainer._loss
    done = {"losses": 0}

    def failing(self, *args, **kwargs):
        if done["losses"] >= limit:
            raise RuntimeError(f"injected failure in the process of rank {fail_rank}")
        done["losses"] += 1
        return original(self, *args, **kwargs)

    loop.Trainer._loss = failing

sys.exit(main(sys.argv[1:]))
