"""The bench's servers run in sessions of their own; where Linux's autogroup scheduling is on, the bench gives
each session the same scheduling niceness so the load generator is not starved by the server it measures."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deploy.bench import servers


@pytest.mark.skipif(not servers.autogroups_on(), reason="Linux autogroup scheduling is off here")
def test_a_server_started_by_the_bench_gets_its_sessions_group_niceness(tmp_path) -> None:
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    with servers._process_group(cmd, {}, tmp_path / "log", group_nice=7) as proc:
        assert servers.group_nice(proc.pid) == 7
    with servers._process_group(cmd, {}, tmp_path / "log") as proc:
        assert servers.group_nice(proc.pid) == 0            # not asked: left as started


def test_setting_the_niceness_of_a_group_that_is_gone_says_so() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    assert servers.set_group_nice(proc.pid, 5) is False


@pytest.mark.skipif(not servers.autogroups_on(), reason="Linux autogroup scheduling is off here")
def test_the_server_being_measured_gets_the_group_niceness_and_the_other_waits(tmp_path) -> None:
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    with servers._process_group(cmd, {}, tmp_path / "a") as a, servers._process_group(cmd, {}, tmp_path / "b") as b:
        focus = servers.focus_groups({"http://a": a.pid, "http://b": b.pid}, 15)
        focus("http://a")
        assert (servers.group_nice(a.pid), servers.group_nice(b.pid)) == (15, servers.IDLE_GROUP_NICE)
        focus("http://b")                              # back down from 19 to 15 needs no privilege either
        assert (servers.group_nice(a.pid), servers.group_nice(b.pid)) == (servers.IDLE_GROUP_NICE, 15)
        servers.focus_groups({"http://a": a.pid}, None)("http://b")     # switched off: left alone
        assert servers.group_nice(a.pid) == servers.IDLE_GROUP_NICE
