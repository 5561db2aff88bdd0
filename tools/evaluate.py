"""The evaluation grid's old front door, kept for existing commands: the same as
``python -m microtrain.evaluate`` (see there; the grid itself is ``microtrain.evaluation``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from microtrain.evaluate import main  # noqa: E402 - after the path is set

if __name__ == "__main__":
    sys.exit(main())
