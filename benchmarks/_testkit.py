"""Makes ``testkit/`` importable for the benchmarks and the processes they start: it lives in the checkout, not in
the installed wheel (test fakes are not shipped), so its root goes on ``sys.path`` and ``PYTHONPATH``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
