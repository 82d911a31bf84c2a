import subprocess
import sys

import pytest


@pytest.mark.parametrize("pkg", ["router"])
def test_unbuilt_entry_points_say_so_and_fail(pkg):
    out = subprocess.run([sys.executable, "-m", pkg], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "not implemented yet" in out.stderr
