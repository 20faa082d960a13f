"""nearest_centroids: the coarse-to-fine search against brute force and against its PyTorch twin;
every ISA returns the same scores and ids; ties, padding, the walk, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_values
from edgeplaid import ops
from edgeplaid.ops import reference
from edgeplaid.ops.nearest_centroids import CentroidGroups, centroid_groups, exhaustive


def _brute(x: torch.Tensor, cents: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k best by score, ties to the lower id (stable sort of -score over ascending ids)."""
    s = x.double() @ cents.double().T
    order = torch.sort(-s, dim=1, stable=True).indices[:, :k]
    return s.gather(1, order).float(), order


def _clustered(n: int, n_cent: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    topics = torch.nn.functional.normalize(torch.randn(max(n_cent // 8, 1), dim, generator=g), dim=-1)

    def near(m: int) -> torch.Tensor:
        t = topics[torch.randint(0, topics.shape[0], (m,), generator=g)]
        noise = torch.nn.functional.normalize(torch.randn(m, dim, generator=g), dim=-1)
        return torch.nn.functional.normalize(t + 0.4 * noise, dim=-1)

    return near(n), near(n_cent)


@pytest.mark.parametrize("dim", [40, 48, 64, 128, 7])
@pytest.mark.parametrize("k", [1, 3])
def test_exhaustive_is_brute_force(cpp_isa, dim, k):
    """Integer-valued inputs: every score is exact, so ids match brute force, ties included."""
    g = torch.Generator().manual_seed(dim + k)
    x, cents = make_values((203, dim), True, g), make_values((77, dim), True, g)
    scores, ids = ops.nearest_centroids(x, exhaustive(cents.numpy()), 1, k=k, backend="cpp")
    want_s, want_i = _brute(x, cents, k)
    assert torch.equal(ids, want_i) and torch.equal(scores, want_s)
    ref_s, ref_i = ops.nearest_centroids(x, exhaustive(cents.numpy()), 1, k=k, backend="reference")
    assert torch.equal(ref_i, want_i) and torch.equal(ref_s, want_s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_tokens(cpp_isa, dtype):
    g = torch.Generator().manual_seed(3)
    x, cents = make_values((64, 48), True, g), make_values((50, 48), True, g)
    _, ids = ops.nearest_centroids(x.to(dtype), exhaustive(cents.numpy()), 1, backend="cpp")
    assert torch.equal(ids, _brute(x, cents, 1)[1])


def test_isas_agree_bit_for_bit():
    """One sequential FMA chain per score on every ISA and path: same scores, same ids."""
    from edgeplaid._native import C

    if C is None:
        pytest.skip("edgeplaid._C is not built")
    x, cents = _clustered(1500, 700, 48, seed=1)
    groups = centroid_groups(cents, 24, degree=8)
    previous, out = C.cpu_isa_state(), []
    try:
        for isa in C.cpu_info()["supported_isas"]:
            C.set_cpu_isa(isa)
            out.append(ops.nearest_centroids(x, groups, 3, k=2, max_steps=4, width=2, backend="cpp"))
    finally:
        C.set_cpu_isa(previous)
    for s, i in out[1:]:
        assert torch.equal(s, out[0][0]) and torch.equal(i, out[0][1])


@pytest.mark.parametrize("dim", [48, 40])
@pytest.mark.parametrize("spill", [1, 2])
def test_every_group_probed_is_exact(cpp_isa, dim, spill):
    x, cents = _clustered(500, 300, dim, seed=dim + spill)
    groups = centroid_groups(cents, 13, degree=0, spill=spill)
    got = ops.nearest_centroids(x, groups, 13, k=4, backend="cpp")
    want = ops.nearest_centroids(x, exhaustive(cents.numpy()), 1, k=4, backend="cpp")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("n_probe,max_steps,width", [(1, 0, 1), (2, 3, 1), (2, 6, 3)])
def test_matches_reference(cpp_isa, n_probe, max_steps, width):
    """Integer-valued inputs (exact scores): the twin's every step, ids and scores, bit for bit."""
    g = torch.Generator().manual_seed(n_probe * 10 + max_steps)
    x, cents = make_values((150, 48), True, g), make_values((200, 48), True, g)
    groups = centroid_groups(cents, 9, degree=6, graph_probe=9)
    got = ops.nearest_centroids(x, groups, n_probe, k=3, max_steps=max_steps, width=width, backend="cpp")
    want = ops.nearest_centroids(
        x, groups, n_probe, k=3, max_steps=max_steps, width=width, backend="reference"
    )
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_matches_reference_real_values():
    """Real values: torch's matmul rounds differently; ids agree but for near-ties."""
    x, cents = _clustered(400, 500, 64, seed=5)
    groups = centroid_groups(cents, 20, degree=16)
    got = ops.nearest_centroids(x, groups, 4, k=2, max_steps=8, backend="cpp")
    want = ops.nearest_centroids(x, groups, 4, k=2, max_steps=8, backend="reference")
    same = (got[1] == want[1]).all(dim=1)
    assert float(same.float().mean()) >= 0.99
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_walk_recovers_recall():
    """Clustered data: the coarse stage alone misses some nearest centroids, the walk finds them."""
    x, cents = _clustered(4000, 2048, 48, seed=11)
    exact = ops.nearest_centroids(x, exhaustive(cents.numpy()), 1)[1][:, 0]
    groups = centroid_groups(cents, 64, degree=32)
    coarse = ops.nearest_centroids(x, groups, 2, max_steps=0)[1][:, 0]
    walked = ops.nearest_centroids(x, groups, 2, max_steps=8)[1][:, 0]
    r0, r1 = float((coarse == exact).float().mean()), float((walked == exact).float().mean())
    assert r1 >= 0.99 and r1 > r0


def test_ties_go_to_the_lower_id(any_backend):
    cents = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    for groups in (exhaustive(cents.numpy()), centroid_groups(cents, 2, degree=2)):
        _, ids = ops.nearest_centroids(x, groups, groups.n_groups, k=2, backend=any_backend)
        assert ids.tolist() == [[0, 2], [1, 3], [0, 1]]


def test_fewer_candidates_than_k_are_padded(any_backend):
    cents = torch.nn.functional.normalize(
        torch.randn(5, 16, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    scores, ids = ops.nearest_centroids(cents, exhaustive(cents.numpy()), 1, k=7, backend=any_backend)
    assert (ids[:, 5:] == -1).all() and torch.isinf(scores[:, 5:]).all()
    assert torch.equal(ids[:, 0], torch.arange(5))  # each centroid is its own nearest
    assert sorted(ids[0, :5].tolist()) == list(range(5))


def test_empty_and_single(any_backend):
    cents = torch.randn(30, 48)
    groups = centroid_groups(cents, 3, degree=4)
    s, i = ops.nearest_centroids(torch.zeros(0, 48), groups, 2, k=2, backend=any_backend)
    assert s.shape == (0, 2) and i.shape == (0, 2)
    one = exhaustive(cents[:1].numpy())
    _, i = ops.nearest_centroids(torch.randn(4, 48), one, 1, k=1, backend=any_backend)
    assert i[:, 0].tolist() == [0, 0, 0, 0]


def test_layout_and_determinism():
    _, cents = _clustered(10, 100, 48, seed=2)
    a = centroid_groups(cents, 7, degree=5, spill=2, seed=4)
    b = centroid_groups(cents, 7, degree=5, spill=2, seed=4)
    for name in (
        "group_blocks",
        "group_block_ids",
        "member_blocks",
        "member_block_ids",
        "group_offsets",
        "graph",
    ):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    ids = a.member_block_ids.numpy()
    real = ids[ids >= 0]
    assert np.array_equal(np.bincount(real, minlength=100), np.full(100, 2))  # spill 2: two groups each
    for gr in range(a.n_groups):  # ids ascending within a group, padding (-1) at the end only
        g_ids = ids[int(a.group_offsets[gr]) : int(a.group_offsets[gr + 1])].reshape(-1)
        kept = g_ids[g_ids >= 0]
        assert np.all(np.diff(kept) > 0) and np.all(g_ids[len(kept) :] == -1)
    blocks = a.member_blocks.numpy()
    lanes = blocks.transpose(0, 2, 1).reshape(-1, 48)
    flat = ids.reshape(-1)
    np.testing.assert_array_equal(lanes[flat >= 0], cents.numpy()[flat[flat >= 0]])
    assert (a.graph.numpy() != np.arange(100)[:, None]).all()  # no centroid is its own neighbour


def test_errors(any_backend):
    cents = torch.randn(40, 48)
    groups = centroid_groups(cents, 4, degree=3)
    x = torch.randn(5, 48)
    with pytest.raises(ValueError, match="n_probe"):
        ops.nearest_centroids(x, groups, 5, backend=any_backend)
    with pytest.raises(ValueError, match="n_probe"):
        ops.nearest_centroids(x, groups, 0, backend=any_backend)
    with pytest.raises(ValueError, match="k"):
        ops.nearest_centroids(x, groups, 1, k=0, backend=any_backend)
    with pytest.raises(ValueError, match="max_steps"):
        ops.nearest_centroids(x, groups, 1, max_steps=-1, backend=any_backend)
    with pytest.raises(ValueError, match="width"):
        ops.nearest_centroids(x, groups, 1, width=0, backend=any_backend)
    with pytest.raises(ValueError, match="tokens"):
        ops.nearest_centroids(torch.randn(5, 40), groups, 1, backend=any_backend)
    with pytest.raises(ValueError, match="n_groups"):
        centroid_groups(cents, 41)


def test_bad_graph_id_is_reported():
    from edgeplaid._native import C

    if C is None:
        pytest.skip("edgeplaid._C is not built")
    cents = torch.randn(40, 48)
    g = centroid_groups(cents, 4, degree=3)
    bad = g.graph.clone()
    bad[:] = 40
    broken = CentroidGroups(
        g.group_blocks,
        g.group_block_ids,
        g.member_blocks,
        g.member_block_ids,
        g.group_offsets,
        g.centroids,
        bad,
    )
    with pytest.raises(ValueError, match="graph: neighbour id 40"):
        ops.nearest_centroids(torch.randn(5, 48), broken, 1, backend="cpp")
    offsets = g.group_offsets.clone()
    offsets[-1] = 10_000
    broken = CentroidGroups(
        g.group_blocks, g.group_block_ids, g.member_blocks, g.member_block_ids, offsets, g.centroids
    )
    with pytest.raises(ValueError, match="out of range"):
        ops.nearest_centroids(torch.randn(64, 48), broken, 4, backend="cpp")
    assert reference.BLOCK_LANES == 16
