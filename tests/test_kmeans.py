import numpy as np
import pytest

from index.kmeans import KMeansParams, child_cap, fit_children, rebalance
from index.route import Descender, route
from index.tree import Tree, path_block_ids, generic_block_ids, n_tree_blocks, block_level


def blobs(n, k, dim=32, seed=0, spread=0.15, weights=None):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    label = rng.choice(k, size=n, p=weights)
    x = centres[label] + spread * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), label


def test_recovers_separated_clusters():
    x, label = blobs(3000, 4)
    ch = fit_children(x, KMeansParams(k=4), seed=0)
    assign = Descender(Tree(4, 1, 32, [ch.centroids], [ch.biases])).route(x)[:, 0]
    # each true cluster maps to one fitted child
    for c in range(4):
        counts = np.bincount(assign[label == c], minlength=4)
        assert counts.max() / counts.sum() > 0.99


def test_balance_cap_holds_under_skew_via_biases():
    # one blob holds 70% of the points; the cap 1.5/4 forces the fitted rule to split it
    x, _ = blobs(4000, 4, weights=[0.7, 0.1, 0.1, 0.1])
    ch = fit_children(x, KMeansParams(k=4, balance_factor=1.5), seed=1)
    cap = child_cap(len(x), 4, 1.5)
    assert ch.sample_counts.max() <= cap
    routed = route(Tree(4, 1, 32, [ch.centroids], [ch.biases]), x)[:, 0]
    assert np.bincount(routed, minlength=4).max() <= cap  # the router's arithmetic agrees with the fitter's
    # without the biases plain nearest-centroid routing overfills a child
    plain = route(Tree(4, 1, 32, [ch.centroids], [np.zeros(4, np.float32)]), x)[:, 0]
    assert np.bincount(plain, minlength=4).max() > cap


def test_subsample_cap_is_tightened_so_unseen_points_fit():
    x, _ = blobs(40000, 8, weights=[0.5] + [0.5 / 7] * 7)
    sample = x[:8000]
    ch = fit_children(sample, KMeansParams(k=8, balance_factor=1.5), seed=2, node_size=len(x))
    routed = route(Tree(8, 1, 32, [ch.centroids], [ch.biases]), x)[:, 0]
    assert np.bincount(routed, minlength=8).max() <= child_cap(len(x), 8, 1.5)


def test_fit_is_deterministic_and_seed_dependent():
    x, _ = blobs(2000, 6)
    a = fit_children(x, KMeansParams(k=6), seed=5)
    b = fit_children(x, KMeansParams(k=6), seed=5)
    c = fit_children(x, KMeansParams(k=6, steps=1), seed=6)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.biases, b.biases)
    assert not np.array_equal(a.centroids, c.centroids)


def test_rebalance_moves_surplus_to_smallest():
    rng = np.random.default_rng(0)
    assign = np.array([0] * 90 + [1] * 10)
    out = rebalance(assign, 4, cap=30, rng=rng)
    assert np.bincount(out, minlength=4).max() <= 30 and len(out) == 100


def test_fewer_points_than_children():
    x, _ = blobs(3, 1)
    ch = fit_children(x, KMeansParams(k=8), seed=0)
    assert ch.centroids.shape == (8, 32) and ch.sample_counts.sum() == 3 and ch.sample_counts.max() == 1


def test_descender_matches_bruteforce_greedy_descent():
    k, depth, dim = 3, 3, 16
    rng = np.random.default_rng(3)
    cents = [rng.normal(size=(k**l, dim)).astype(np.float32) for l in range(1, depth + 1)]
    biases = [rng.normal(scale=0.1, size=k**l).astype(np.float32) for l in range(1, depth + 1)]
    tree = Tree(k, depth, dim, cents, biases)
    x = rng.normal(size=(500, dim)).astype(np.float32)
    paths = route(tree, x)
    for i in range(len(x)):
        node = 0
        for l in range(depth):
            kids = np.arange(node * k, node * k + k)
            d = ((x[i] - cents[l][kids]) ** 2).sum(1) + biases[l][kids]
            child = int(np.argmin(d))
            assert paths[i, l] == child
            node = node * k + child


def test_block_numbering():
    k, p = 4, 3
    assert n_tree_blocks(k, p) == 4 + 16 + 64
    ids = path_block_ids(np.array([[0, 0, 0], [3, 3, 3], [1, 2, 3]]), k)
    assert ids.tolist() == [[0, 4, 20], [3, 19, 83], [1, 4 + 6, 20 + 27]]
    assert generic_block_ids(k, p).tolist() == [84, 85, 86]
    assert [block_level(int(b), k, p) for b in (0, 3, 4, 19, 20, 83, 84, 86)] == [1, 1, 2, 2, 3, 3, 1, 3]
    # every tree block id is hit exactly once by the set of all paths
    all_paths = np.stack(np.meshgrid(*[np.arange(k)] * p, indexing="ij"), -1).reshape(-1, p)
    assert np.unique(path_block_ids(all_paths, k)).tolist() == list(range(n_tree_blocks(k, p)))


def test_tree_save_load_roundtrip_and_corruption(tmp_path):
    x, _ = blobs(200, 2)
    ch = fit_children(x, KMeansParams(k=2), seed=0)
    tree = Tree(2, 1, 32, [ch.centroids], [ch.biases], counts=[ch.sample_counts])
    tree.save(tmp_path)
    back = Tree.load(tmp_path)
    assert back.version == tree.version and np.array_equal(back.centroids[0], tree.centroids[0])
    (tmp_path / "tree.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="corrupt"):
        Tree.load(tmp_path)


def test_child_sums_are_the_bits_of_add_at():
    from index.kmeans import child_sums

    rng = np.random.default_rng(3)
    for n in (1, 7, 500):
        x = rng.normal(size=(n, 24)).astype(np.float32)
        assign = rng.integers(0, 5, n)
        assign[assign == 2] = 3  # an empty child
        want = np.zeros((6, 24))
        np.add.at(want, assign, x)
        got = child_sums(x, assign, np.bincount(assign, minlength=6).astype(np.float64))
        assert np.array_equal(got, want)
