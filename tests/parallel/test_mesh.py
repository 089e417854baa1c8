"""parallel.ep and parallel.target are checked against the world size and the target before anything is built."""

import pytest

from eagle_trainer.config import ParallelConfig
from eagle_trainer.parallel import check_experts
from eagle_trainer.parallel.mesh import backend_for, resolve_ep


def test_ep_resolves_against_the_world_size():
    assert resolve_ep(ParallelConfig(ep=0), 8) == 8
    assert resolve_ep(ParallelConfig(ep=2), 8) == 2
    assert resolve_ep(ParallelConfig(ep=1, target="replicate"), 4) == 1
    with pytest.raises(ValueError, match=r"parallel.ep=3 does not divide the world size 8"):
        resolve_ep(ParallelConfig(ep=3), 8)
    with pytest.raises(ValueError, match=r"parallel.ep=2 needs parallel.target=fsdp"):
        resolve_ep(ParallelConfig(ep=2, target="replicate"), 4)
    with pytest.raises(ValueError, match=r"parallel.target='tp' is not one of"):
        resolve_ep(ParallelConfig(target="tp"), 4)
    with pytest.raises(ValueError, match=r"parallel.prefetch_blocks=0 must be at least 1"):
        resolve_ep(ParallelConfig(prefetch_blocks=0), 4)
    with pytest.raises(ValueError, match=r"parallel.ep_chunks=0 must be at least 1"):
        resolve_ep(ParallelConfig(ep=2, ep_chunks=0), 4)


def test_ep_must_divide_the_experts():
    check_experts(1, None)  # dense target, no expert parallelism
    check_experts(4, 128)
    with pytest.raises(ValueError, match=r"parallel.ep=3 does not divide the target's 128 routed experts"):
        check_experts(3, 128)
    with pytest.raises(ValueError, match=r"parallel.ep=2 but the target has no routed experts"):
        check_experts(2, None)


def test_backend_choice():
    import torch
    assert backend_for("auto", torch.device("cpu")) == "gloo"
    assert backend_for("auto", torch.device("cuda", 0)) == "nccl"
    with pytest.raises(ValueError, match="parallel.backend='mpi'"):
        backend_for("mpi", torch.device("cpu"))
