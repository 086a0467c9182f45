"""`runmap status` and `runmap down` over an SSH cluster held by another process."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from sshd_hosts import SshHosts
from test_cli import runmap_cmd

CLIENT = textwrap.dedent(
    """
    import sys
    import runmap as rm

    with rm.cluster("ssh", hosts=["host-a", "host-b"], name="sshcli", config_file=sys.argv[1]) as c:
        env = rm.env(name="worker", compute={"CPU": 2})
        m = rm.mapper(rm.function(abs).to(c, env=env), num_replicas=2, replace_dead=False)
        print(sorted(r.servlet.host for r in m.replicas), flush=True)
        sys.stdin.readline()  # until the test says the replicas were ended
        print(sorted(r.remote.servlet.exit_reason() for r in m._pool.replicas), flush=True)
        m.close()
    """
)


def test_status_lists_and_down_ends_ssh_replicas(ssh_hosts: SshHosts, tmp_path: Path) -> None:
    home = tmp_path / "home"
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(ssh_hosts.config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "RUNMAP_HOME": str(home)},
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    try:
        assert client.stdout.readline().strip() == "['host-a', 'host-b']"
        status = runmap_cmd(home, "status")
        rows = [line.split() for line in status.stdout.splitlines()[1:]]
        assert sorted((r[0], r[1], r[5]) for r in rows) == [("sshcli", "ssh", "host-a"), ("sshcli", "ssh", "host-b")]
        assert all(r[7].endswith(".sock") for r in rows)  # reached through the SSH connection
        assert any("runmap.server" in " ".join(p.cmdline()) for p in ssh_hosts.processes("host-a"))

        down = runmap_cmd(home, "down", "--all")
        assert down.returncode == 0, down.stderr
        assert "sshcli: ended 2 servlet(s)" in down.stdout
        client.stdin.write("go\n")
        client.stdin.flush()
        reasons = client.stdout.readline().strip()
        # The client saw both replicas end, and neither as a lost host: the second one's session
        # ends while its cluster closes its connections, which is no lost host either.
        ended = ast.literal_eval(reasons)  # the printed list of both exit reasons
        assert len(ended) == 2, reasons
        assert all("session was ended on this machine" in r for r in ended), reasons
        ssh_hosts.assert_clean("host-a", within=10)
        ssh_hosts.assert_clean("host-b", within=10)
    finally:
        client.stdin.close()
        client.wait(60)
        client.stdout.close()
