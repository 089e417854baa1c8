"""eagle_trainer.types helpers."""

import pytest
import torch

from eagle_trainer.types import HostCopy


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_host_copy_holds_the_values_when_queued(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    x = torch.tensor([1.5, -2.0, float("nan")], device=device)
    copy = HostCopy(x)
    x.fill_(7.0)  # queued after the copy
    values = copy.tolist()
    assert values[:2] == [1.5, -2.0] and values[2] != values[2]
    assert HostCopy(torch.tensor(0.25, device=device)).tolist() == 0.25  # 0-d: a float, as the trainer reads a norm
