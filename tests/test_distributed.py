"""Reading the launcher's variables and sharing work out (one process; the real multi-process
runs are in test_add_many_torchrun.py and test_render_batch.py)."""

from __future__ import annotations

import pytest

from celebctl.distributed import Group, Launch, device_for, launch_from_env, shard
from celebctl.errors import InvalidOption


def test_torchrun_and_accelerate_variables():
    assert launch_from_env({}) == Launch(0, 1, 0)
    launch = launch_from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert launch == Launch(5, 8, 1) and launch.distributed and not launch.is_main
    assert launch_from_env({"RANK": "0", "WORLD_SIZE": "2"}) == Launch(0, 2, 0)


def test_srun_variables_stand_in_when_rank_is_not_set():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3",
           "MASTER_ADDR": "node1"}
    assert launch_from_env(env) == Launch(3, 4, 3)
    del env["MASTER_ADDR"]
    with pytest.raises(InvalidOption, match="export them"):
        launch_from_env(env)
    # torchrun's own variables win inside an srun allocation.
    assert launch_from_env({**env, "RANK": "1", "WORLD_SIZE": "2"}) == Launch(1, 2, 1)


@pytest.mark.parametrize("env,says", [
    ({"RANK": "1"}, "must be set together"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "does not fit"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "not a whole number"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "negative"),
])
def test_bad_launcher_variables_are_refused(env, says):
    with pytest.raises(InvalidOption, match=says):
        launch_from_env(env)


def test_shares_are_disjoint_deterministic_and_cover_everything():
    items = list(range(11))
    shares = [shard(items, Launch(rank, 3, rank)) for rank in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(x for share in shares for x in share) == items


def test_one_process_needs_no_process_group():
    with Group(Launch()) as group:
        assert group.broadcast("x") == "x"
        assert group.gather({"a": 1}) == [{"a": 1}]
        assert group.add("done", 2) == 2 and group.count("done") == 2
        group.wait_for("done", 2)  # already there: returns at once


def test_device_follows_the_local_rank_only_when_several_processes_share_gpus(monkeypatch):
    import torch

    assert device_for("auto", Launch()) == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_for("auto", Launch(3, 4, 1)) == "cuda:1"
    assert device_for("cuda", Launch(3, 4, 1)) == "cuda:1"
    assert device_for("cpu", Launch(3, 4, 1)) == "cpu"
    with pytest.raises(InvalidOption, match="--nproc-per-node 2"):
        device_for("auto", Launch(2, 4, 2))
