from __future__ import annotations

import sys
from pathlib import Path

# make tests/ helpers importable as plain modules (dicomgen, netutil)
sys.path.insert(0, str(Path(__file__).resolve().parent))
