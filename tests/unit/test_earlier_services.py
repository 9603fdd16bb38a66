"""`ensemble serve` finds another local service that is still running (deploy/orphans.py: earlier_services)."""

from __future__ import annotations

import subprocess
import sys

from deploy.orphans import earlier_services


def test_another_ensemble_serve_process_is_found_and_this_one_is_not(tmp_path) -> None:
    fake = tmp_path / "ensemble"          # a process whose command line is `.../ensemble serve --config x`
    fake.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    fake.chmod(0o755)
    proc = subprocess.Popen([sys.executable, str(fake), "serve", "--config", "x"])
    try:
        assert proc.pid in {p.pid for p in earlier_services()}
    finally:
        proc.kill()
        proc.wait()
    assert proc.pid not in {p.pid for p in earlier_services()}
