"""``python -m specdec.training head=... model=...``: see specdec/training/train.py."""

import sys

from specdec.training.train import main

sys.exit(main())
