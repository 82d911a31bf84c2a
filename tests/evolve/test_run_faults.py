"""A full disk or a read-only run directory during a save: the run stops with a clear error (exit 2, the file,
the operating system's reason, what to do), the state saved before is intact byte for byte with no temporary file
left, and ``--resume`` from it, once there is room, reaches the uninterrupted run's archive.

The faults are real: a private mount namespace holds a small tmpfs, filled to the last block (ENOSPC) or
remounted read-only (EROFS). That needs root (``unshare``); without it, the read-only case uses a directory
without write permission (EACCES) and the full-disk case is skipped, saying why.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evolve.run import Evolution
from evolve.rundir import STATE_FILE, RunError, RunState, archive_ids, genomes_equal
from tests.evolve.minis import mini_evolve_config


def _can_mount(probe: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe.mkdir(parents=True, exist_ok=True)
    cmd = ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs"]
    return subprocess.run([*cmd, str(probe)], capture_output=True, timeout=300).returncode == 0


def test_a_failed_save_is_a_run_error_and_leaves_nothing_behind(tmp_path):
    st = RunState()
    st.genomes["g"] = torch.zeros(3)
    st.save(tmp_path / STATE_FILE)
    before = (tmp_path / STATE_FILE).read_bytes()
    with pytest.raises(
        RunError, match=r"gone/state.safetensors: cannot save generation 0 \(No such file or directory\)"
    ):
        st.save(tmp_path / "gone" / STATE_FILE)  # a vanished run directory
    assert (tmp_path / STATE_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]


@pytest.fixture(scope="module")
def partial_run(mini_models, tmp_path_factory):
    """A run of 4 generations stopped after 2 (saved), and the uninterrupted run's final state."""
    root = tmp_path_factory.mktemp("faults")
    cfg = mini_evolve_config(mini_models, generations=4)
    reference = Evolution(root / "reference", cfg)
    reference.run()
    partial = Evolution(root / "partial", cfg)
    partial.step()
    partial.step()
    partial.close()
    return cfg, reference.state, root / "partial"


def _resume_under(fault: str, partial: Path, work: Path) -> tuple[int, str, Path]:
    """Resume a copy of ``partial`` with the CLI while ``fault`` holds; returns its exit code, its stderr (blanks
    collapsed) and the run directory as the fault left it (copied out of the namespace)."""
    mnt, after = work / "mnt", work / "after"
    mnt.mkdir(parents=True)
    env = dict(os.environ, COLUMNS="400", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    cli = f"{sys.executable} -m evolve run --out {mnt}/run --resume"
    if _can_mount(work / "probe"):
        setup = f"mount -t tmpfs -o size=4m tmpfs {mnt} && cp -a {partial} {mnt}/run"
        if fault == "full":
            setup += f" && (dd if=/dev/zero of={mnt}/filler bs=4k 2>/dev/null || true)"
        else:
            setup += f" && mount -o remount,ro {mnt}"
        script = f"{setup} && {{ {cli}; echo $? > {work}/rc; }} 2> {work}/stderr; cp -a {mnt}/run {after}"
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env, timeout=600)
        rc, stderr = int((work / "rc").read_text()), (work / "stderr").read_text()
    else:
        if fault == "full":
            pytest.skip("filling a real file system needs root (a private mount namespace with a small tmpfs)")
        shutil.copytree(partial, mnt / "run")
        (mnt / "run").chmod(stat.S_IRUSR | stat.S_IXUSR)
        out = subprocess.run(cli.split(), env=env, capture_output=True, text=True, timeout=600)
        (mnt / "run").chmod(stat.S_IRWXU)
        shutil.copytree(mnt / "run", after)
        rc, stderr = out.returncode, out.stderr
    return rc, " ".join(stderr.split()), after


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_full_disk_or_read_only_run_directory_stops_the_run_and_keeps_the_last_state(partial_run, tmp_path, fault):
    cfg, reference, partial = partial_run
    rc, stderr, after = _resume_under(fault, partial, tmp_path)
    reasons = {"full": ["No space left on device"], "read-only": ["Read-only file system", "Permission denied"]}
    assert rc == 2, stderr
    assert "cannot save generation 3" in stderr and "--resume" in stderr, stderr
    assert any(r in stderr for r in reasons[fault]), stderr
    assert "Traceback" not in stderr
    assert (after / STATE_FILE).read_bytes() == (partial / STATE_FILE).read_bytes()
    assert sorted(p.name for p in after.iterdir()) == sorted(p.name for p in partial.iterdir())  # no temp file

    resumed = Evolution(after, cfg, resume=True)  # once there is room again
    assert resumed.state.generation == 2
    resumed.run()
    assert archive_ids(resumed.state) == archive_ids(reference)
    assert genomes_equal(resumed.state, reference)


@pytest.mark.slow
def test_the_sigkill_campaign_at_two_points_ends_with_the_uninterrupted_archive(tmp_path):
    """``benchmarks/reliability_evolve.py`` does 5 points; the same campaign at 2 points (one may fall in set-up)."""
    from benchmarks.reliability_evolve import campaign

    result = campaign(tmp_path, n_points=2, generations=4, seed=3)
    assert len(result["kills"]) == 2 and result["genomes_compared"] >= 3
    assert result["checks"] == dict.fromkeys(result["checks"], True)
