"""The lab the demo and the tests use.

Fresh hosts, git-lfs fixture repositories, random-weight checkpoints, stand-in servers, the demo,
and the lab's benchmarks (provisioning, tunnel, the cross-check against AIPerf).
"""
