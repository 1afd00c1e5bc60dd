"""Hostfile parsing: what DeepSpeed accepts, with errors that name the line."""

import pytest

from launch.hostfile import Host, HostfileError, hostfile_text, parse_hostfile, read_hostfile, uniform_slots


def test_parses_hosts_in_order_ignoring_comments():
    text = "# cluster A\nnode-001 slots=8   # first\n\n  node-002   slots=8\n10.0.0.3 slots=4\n"
    assert parse_hostfile(text) == [Host("node-001", 8), Host("node-002", 8), Host("10.0.0.3", 4)]


@pytest.mark.parametrize(
    "text, match",
    [
        ("node-001 slots=8\nnode-002 8\n", r"hosts:2: cannot parse 'node-002 8'"),
        ("node-001 slots=0\n", r"hosts:1: slots must be a positive integer"),
        ("node-001 slots=x\n", r"slots must be a positive integer, got 'x'"),
        (
            "node-001 slots=8\nnode-001 slots=8\n",
            r"hosts:2: host 'node-001' is listed again \(first on line 1\)",
        ),
        ("# nothing\n\n", r"no hosts"),
    ],
)
def test_errors_name_the_line_and_the_fix(text, match):
    with pytest.raises(HostfileError, match=match):
        parse_hostfile(text, "hosts")


def test_read_write_roundtrip_and_missing_file(tmp_path):
    hosts = [Host("a", 8), Host("b", 8)]
    path = tmp_path / "h"
    path.write_text(hostfile_text(hosts))
    assert path.read_text() == "a slots=8\nb slots=8\n"
    assert read_hostfile(path) == hosts
    with pytest.raises(HostfileError, match="does not exist"):
        read_hostfile(tmp_path / "nope")


def test_uniform_slots():
    assert uniform_slots([Host("a", 8), Host("b", 8)], "torchrun") == 8
    with pytest.raises(HostfileError, match="torchrun needs the same slots on every host, got a=8, b=4"):
        uniform_slots([Host("a", 8), Host("b", 4)], "torchrun")
