"""Compare training runs side by side: ``python scripts/compare.py RUN_OR_SWEEP_DIR... [--out DIR]``.

The command line of ``moemesh.runs.compare`` (see its docstring: the table, the charts, the notes).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: moemesh without pip install

from moemesh.runs.compare import main  # noqa: E402

if __name__ == "__main__":
    main()
