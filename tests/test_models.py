"""The models: the notebook's network exactly, and prefix-free state dicts."""

import torch
from torch import nn

from mnist_dist.models import BestCNN, FastCNN, PoolFirstCNN, SeedCNN, build_model, clean_state_dict, count_parameters


def test_seed_model_is_the_notebook_network():
    layers = list(SeedCNN())
    kinds = [type(m) for m in layers]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.MaxPool2d,
                     nn.Flatten, nn.Linear, nn.Linear, nn.Linear]
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 32), (32, 16), (16, 8)]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (0, 0) for c in convs)
    assert layers[6].kernel_size == 2
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(968, 512), (512, 128), (128, 10)]


def test_models_map_a_batch_to_ten_logits():
    for name in ("seed", "fast", "best", "best2"):
        model = build_model(name)
        assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    assert count_parameters(FastCNN()) < count_parameters(SeedCNN())


def test_clean_state_dict_strips_wrapper_prefixes():
    state = {"module._orig_mod.0.weight": 1, "_orig_mod.module.0.bias": 2, "3.weight": 3}
    assert clean_state_dict(state) == {"0.weight": 1, "0.bias": 2, "3.weight": 3}


def test_best2_pools_before_batchnorm_and_best_keeps_its_layout():
    """`--recipe best`'s network (best2): conv -> pool -> BN -> ReLU in the first two blocks, 32/64/128
    channels. `best` (recipe best-v1) keeps its exact layer list and names, so its weights still load."""
    kinds = [type(m) for m in PoolFirstCNN()]
    assert kinds == [nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU] * 2 + \
        [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Flatten, nn.Linear]
    convs = [m for m in PoolFirstCNN() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == \
        [(1, 32, (5, 5)), (32, 64, (3, 3)), (64, 128, (3, 3))]
    assert count_parameters(PoolFirstCNN()) == 800 + 64 + 18_432 + 128 + 73_728 + 256 + 2048 * 10 + 10
    assert [type(m) for m in BestCNN()] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d] * 2 + \
        [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Flatten, nn.Linear]
    assert count_parameters(BestCNN()) == 71_818
    assert sorted(build_model("best").state_dict())[:3] == ["0.weight", "1.bias", "1.num_batches_tracked"]
