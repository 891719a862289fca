"""Sharding, sampler order, IDX validation and the two input paths (in-process, no launcher)."""

from __future__ import annotations

import torch
import pytest

from mnist_dist.data import batches, loader
from mnist_dist.data import mnist as data
from mnist_dist.dist import DistEnv
from mnist_dist.errors import UserError

from conftest import make_fake_mnist, write_idx_images, write_idx_labels


def env(rank: int, world: int) -> DistEnv:
    return DistEnv(rank, rank, world, world, torch.device("cpu"), "gloo" if world > 1 else None)


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_train_shards_are_disjoint_and_cover_the_epoch(world):
    n = 1000
    shards = [batches.rank_indices(n, env(r, world), seed=5, epoch=0) for r in range(world)]
    sizes = {len(s) for s in shards}
    assert sizes == {n // world}, "drop_last: every rank gets the same number of samples"
    union = torch.cat(shards)
    assert len(set(union.tolist())) == len(union), "no index is on two ranks"
    assert len(union) == (n // world) * world  # all but the n % world dropped samples


def test_set_epoch_changes_order_and_seed_repeats_it():
    e = env(0, 2)
    a0 = batches.rank_indices(600, e, seed=1, epoch=0)
    a1 = batches.rank_indices(600, e, seed=1, epoch=1)
    again = batches.rank_indices(600, e, seed=1, epoch=0)
    other_seed = batches.rank_indices(600, e, seed=2, epoch=0)
    assert not torch.equal(a0, a1)
    assert torch.equal(a0, again)
    assert not torch.equal(a0, other_seed)


@pytest.mark.parametrize("world", [1, 2, 3, 6, 7])
def test_eval_shards_are_exact(world):
    n = 10000
    covered = []
    for r in range(world):
        s = batches.eval_shard(n, r, world)
        covered.extend(range(n)[s])
    assert covered == list(range(n)), "contiguous, disjoint, no padding, no duplicates"


def test_rank_batches_union_is_the_single_rank_batch():
    """N ranks x B/N see, step by step, exactly the samples one rank x B sees (DDP equivalence)."""
    n, B = 1200, 60
    single = batches.rank_indices(n, env(0, 1), seed=3, epoch=2)
    per_rank = [batches.rank_indices(n, env(r, 2), seed=3, epoch=2) for r in range(2)]
    for step in range(n // B):
        one = set(single[step * B:(step + 1) * B].tolist())
        two = set(per_rank[0][step * B // 2:(step + 1) * B // 2].tolist()) | set(
            per_rank[1][step * B // 2:(step + 1) * B // 2].tolist())
        assert one == two


def test_both_loaders_give_identical_batches(tmp_path):
    root = make_fake_mnist(tmp_path, n_train=300, n_test=50)
    images, labels = data.load_split(str(root), train=True)
    for normalize in (True, False):
        for rank in range(2):
            e = env(rank, 2)
            tensor_path = batches.TensorBatches(data.to_float(images, normalize), labels, e, 16, seed=7)
            loader_path = loader.LoaderBatches(str(root), normalize, e, 16, seed=7, num_workers=0)
            assert len(tensor_path) == len(loader_path) == 150 // 16
            for epoch in (0, 1):
                pairs = list(zip(tensor_path.epoch(epoch), loader_path.epoch(epoch), strict=True))
                assert len(pairs) == 150 // 16
                for (xa, ya), (xb, yb) in pairs:
                    assert torch.equal(ya, yb)
                    assert torch.equal(xa, xb), "bit-identical pixels"
            # resuming mid-epoch skips exactly the consumed batches on both paths
            full = list(tensor_path.epoch(1))
            for path in (tensor_path, loader_path):
                tail = list(path.epoch(1, start_step=3))
                assert len(tail) == len(full) - 3
                assert all(torch.equal(a[1], b[1]) for a, b in zip(tail, full[3:]))


def test_dataloader_workers_give_the_same_batches(tmp_path):
    root = make_fake_mnist(tmp_path, n_train=200, n_test=20)
    images, labels = data.load_split(str(root), train=True)
    e = env(1, 2)
    tensor_path = batches.TensorBatches(data.to_float(images, True), labels, e, 10, seed=0)
    loader_path = loader.LoaderBatches(str(root), True, e, 10, seed=0, num_workers=2)
    for (xa, ya), (xb, yb) in zip(tensor_path.epoch(3), loader_path.epoch(3), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_normalisation_matches_mnist_statistics(mnist_root):
    images, labels = data.load_split(str(mnist_root), train=True)
    x = data.to_float(images, normalize=True)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    counts = torch.bincount(labels, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_idx_validation(tmp_path, monkeypatch):
    root = make_fake_mnist(tmp_path, n_train=60000, n_test=10000)
    data.validate_files(root)  # well-formed
    raw = data.raw_dir(root)
    path = raw / "t10k-images-idx3-ubyte"
    # truncated
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        data.validate_files(root)
    # wrong magic number
    write_idx_labels(path, torch.zeros(10000, dtype=torch.uint8))
    with pytest.raises(UserError, match="magic number 2049"):
        data.validate_files(root)
    # too short for a header
    path.write_bytes(b"\x00\x00")
    with pytest.raises(UserError, match="shorter than an IDX header"):
        data.validate_files(root)
    # wrong item count: refused by default, accepted only when a subset is asked for explicitly
    write_idx_images(path, torch.zeros(10, 28, 28, dtype=torch.uint8))
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", torch.zeros(10, dtype=torch.uint8))
    monkeypatch.delenv(data.SUBSET_ENV, raising=False)
    with pytest.raises(UserError, match=r"10 items, expected 10000 \(a subset on purpose\? set MNIST_DIST_ALLOW_SUBSET=1\)"):
        data.validate_files(root)
    monkeypatch.setenv(data.SUBSET_ENV, "1")
    data.validate_files(root)
    monkeypatch.setenv(data.SUBSET_ENV, "0")
    with pytest.raises(UserError, match="10 items, expected 10000"):
        data.validate_files(root)


def test_missing_files_and_data_dir_resolution(tmp_path, monkeypatch):
    assert len(data.missing_files(tmp_path)) == 4
    monkeypatch.setenv(data.DATA_DIR_ENV, "/from/env")
    assert data.resolve_data_dir(None) == "/from/env"
    assert data.resolve_data_dir("/flag") == "/flag"
    monkeypatch.delenv(data.DATA_DIR_ENV)
    assert data.resolve_data_dir(None) == "./data"
