"""Config validation is clear from the command line (`ensemble serve`) and through Serve's own path
(`serve run`/`serve deploy` call deploy.app:app_builder with the YAML's args)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.config import DEFAULT_CONFIG, ConfigError

pytestmark = pytest.mark.integration


def bad_config(tmp_path: Path, **args) -> Path:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["applications"][0]["args"].update(args)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("args, expected", [
    ({"top_k": 0}, "applications[0].args.top_k: Input should be greater than or equal to 1 (got 0)"),
    ({"mix_space": "geometric"}, "applications[0].args.mix_space: Input should be 'logits' or 'probs'"),
    ({"traffic_log": {"path": "x.db", "compress": True}}, "applications[0].args.traffic_log.compress"),
])
def test_ensemble_serve_names_the_bad_field_and_exits_2(tmp_path, args, expected) -> None:
    cmd = [sys.executable, "-m", "orchestrator.cli", "serve", "--config", str(bad_config(tmp_path, **args))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_app_builder_names_the_bad_field() -> None:
    from deploy.app import app_builder

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())["applications"][0]["args"]
    raw["experts"][1]["num_cpus"] = -2
    with pytest.raises(ConfigError, match=r"experts\[1\]\.num_cpus: .*>= 0.*\(got -2\)"):
        app_builder(raw)
