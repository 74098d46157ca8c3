"""The ``hosts`` setting: what a lab writes, and the sentence it gets when it is wrong."""

from __future__ import annotations

import pytest

from gpuspawner.hosts import Host, HostsError, parse_hosts


def test_hosts_by_url_or_by_mapping():
    found = parse_hosts({
        "gpu1": "unix:///var/run/docker.sock",
        "gpu2": {"url": "tcp://gpu2.lab:2376", "tls_ca": "/etc/gpuspawner/ca.pem",
                 "tls_cert": "/etc/gpuspawner/cert.pem", "tls_key": "/etc/gpuspawner/key.pem"},
        "gpu3": {"url": "ssh://admin@gpu3.lab", "address": "10.0.0.3"},
    })
    assert found == (
        Host("gpu1", "unix:///var/run/docker.sock"),
        Host("gpu2", "tcp://gpu2.lab:2376", None, "/etc/gpuspawner/ca.pem",
             "/etc/gpuspawner/cert.pem", "/etc/gpuspawner/key.pem"),
        Host("gpu3", "ssh://admin@gpu3.lab", "10.0.0.3"),
    )
    assert [h.reach for h in found] == ["127.0.0.1", "gpu2.lab", "10.0.0.3"]


@pytest.mark.parametrize(("hosts", "words"), [
    ({}, "at least one host"),
    ({"gpu2": "tcp://gpu2:2376"}, "host gpu2: a tcp:// engine needs tls_ca, tls_cert and tls_key"),
    ({"gpu2": "http://gpu2:2375"}, "host gpu2: endpoint 'http://gpu2:2375' must start with"),
    ({"gpu2": {"url": "unix:///s", "tls_ca": "/ca"}}, "TLS files apply to tcp:// endpoints"),
    ({"gpu2": {"url": "unix:///s", "adress": "x"}}, "host gpu2: unknown key(s) adress"),
    ({"a,b": "unix:///s"}, "without commas"),
    ({"gpu2": 2376}, "host gpu2: give its Docker endpoint"),
])
def test_a_wrong_setting_names_the_host_and_the_fix(hosts, words):
    with pytest.raises(HostsError) as caught:
        parse_hosts(hosts)
    assert words in str(caught.value)
