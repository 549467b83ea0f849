"""Slurm hostlist expansion against `scontrol show hostnames`.

RECORDED holds the output of `scontrol show hostnames LIST` of Debian's
slurm-client 22.05.8, captured on this machine (SLURM_CONF pointing at a
minimal config, no daemon needed); `test_matches_live_scontrol` repeats the
comparison against whatever scontrol is installed.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from dyn.deploy.hostlist import expand_hostlist
from dyn.errors import ConfigError

RECORDED = {
    "a[1-2]b[1-2]": "a1b1 a1b2 a2b1 a2b2",
    "tux[8-10]": "tux8 tux9 tux10",
    "tux[08-10]": "tux08 tux09 tux10",
    "n[1-010]": "n1 n2 n3 n4 n5 n6 n7 n8 n9 n10",
    "gpu[001-003,010],login1,x[5,3]": "gpu001 gpu002 gpu003 gpu010 login1 x5 x3",
    "a[9-11],b": "a9 a10 a11 b",
    "foo": "foo",
    "a[1-2],a1": "a1 a2 a1",
}
INVALID = ["n[1-3]x", "rack[1-2]-node[01-02]-c", "a[3-1]", "a[]", "x[1-2]y[a]", "a[1-2", "a]b"]


@pytest.mark.parametrize("hostlist", sorted(RECORDED))
def test_recorded_scontrol_outputs(hostlist):
    assert expand_hostlist(hostlist) == RECORDED[hostlist].split()


@pytest.mark.parametrize("hostlist", INVALID)
def test_lists_slurm_rejects_are_errors(hostlist):
    with pytest.raises(ConfigError, match="hostlist"):
        expand_hostlist(hostlist)


def test_an_nvl72_rack():
    hosts = expand_hostlist("gb200-r1-tray[01-18]")
    assert len(hosts) == 18 and hosts[0] == "gb200-r1-tray01" and hosts[-1] == "gb200-r1-tray18"


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol (slurm-client) not installed")
def test_matches_live_scontrol(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=localhost\n")
    for hostlist, expected in RECORDED.items():
        result = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True,
                                env={"SLURM_CONF": str(conf), "PATH": "/usr/bin:/bin"}, timeout=30)
        assert result.stdout.split() == expand_hostlist(hostlist) == expected.split(), hostlist
