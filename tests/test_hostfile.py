"""Hostfiles and rank environments per backend; what Linux cannot run is refused with the reason."""

from __future__ import annotations

import json

import pytest

from arthur_cluster import hostfile as hf


def test_ring_hostfile_and_env(tmp_path):
    hosts = hf.hosts_from(["mac1=10.0.0.1", {"ssh": "mac2", "ips": ["10.0.0.2"]}, "10.0.0.3"])
    data = json.loads(hf.write_hostfile(tmp_path / "h.json", "ring", hosts).read_text())
    assert data == [{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]},
                    {"ssh": "10.0.0.3", "ips": ["10.0.0.3"]}]
    ring = hf.loopback_ring(3)
    assert len({a for (a,) in ring}) == 3 and all(a.startswith("127.0.0.1:") for (a,) in ring)
    env = hf.rank_env("ring", 2, 3, files=tmp_path, ring=ring)
    assert env["MLX_RANK"] == "2" and json.loads(open(env["MLX_HOSTFILE"]).read()) == ring
    with pytest.raises(hf.HostfileError, match="needs IP addresses; give them for mac2"):
        hf.ring_hostfile(hf.hosts_from(["mac1=10.0.0.1", "mac2"]))


def test_jaccl_hostfile_needs_a_full_device_matrix(tmp_path):
    good = [hf.Host("a", ["10.0.0.1"], [None, "rdma_en2"]), hf.Host("b", ["10.0.0.2"], ["rdma_en2", None])]
    data = json.loads(hf.write_hostfile(tmp_path / "j.json", "jaccl", good).read_text())
    assert data[0]["rdma"] == [None, "rdma_en2"] and data[1]["rdma"] == ["rdma_en2", None]
    env = hf.rank_env("jaccl", 1, 2, files=tmp_path, coordinator="10.0.0.1:5000",
                      rdma=[h.rdma for h in good])
    assert env["MLX_JACCL_COORDINATOR"] == "10.0.0.1:5000"
    assert json.loads(open(env["MLX_IBV_DEVICES"]).read()) == [[None, "rdma_en2"], ["rdma_en2", None]]
    with pytest.raises(hf.HostfileError, match="host b lists no RDMA device towards a"):
        hf.jaccl_hostfile([good[0], hf.Host("b", ["10.0.0.2"], [None, None])])
    with pytest.raises(hf.HostfileError, match="rdma list has 1 entries for 2 hosts"):
        hf.jaccl_hostfile([hf.Host("a", ["10.0.0.1"], [None]), good[1]])


def test_nccl_env():
    env = hf.rank_env("nccl", 1, 2, nccl_host="10.0.0.1", nccl_port=1234)
    assert env == {"MLX_RANK": "1", "NCCL_HOST_IP": "10.0.0.1", "NCCL_PORT": "1234", "MLX_WORLD_SIZE": "2",
                   "CUDA_VISIBLE_DEVICES": "1"}


def test_backends_this_machine_cannot_run_are_refused():
    import mlx.core as mx

    hf.check_backend("ring")  # built into every mlx
    if not mx.distributed.is_available("jaccl"):
        with pytest.raises(hf.BackendUnavailable, match=r"macOS 26\.2 .*Thunderbolt 5.*rdma_ctl enable"):
            hf.check_backend("jaccl")
    if not mx.distributed.is_available("nccl"):
        with pytest.raises(hf.BackendUnavailable, match="CUDA build of mlx"):
            hf.check_backend("nccl")
    with pytest.raises(hf.BackendUnavailable, match="unknown backend"):
        hf.check_backend("carrier-pigeon")
