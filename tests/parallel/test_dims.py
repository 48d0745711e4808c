from moemesh.parallel.dims import MeshAxis, ParallelDims, padded_vocab


def test_seed_layout_dp4_ep2():
    # The seed's figure: WORLD_SIZE=8, DP=4, EP=2.
    d = ParallelDims(dp=4, ep=2)
    assert d.groups(MeshAxis.EP) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert d.groups(MeshAxis.DP) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert d.groups((MeshAxis.DP, MeshAxis.EP)) == [list(range(8))]
    assert d.coords(5) == {MeshAxis.PP: 0, MeshAxis.DP: 2, MeshAxis.EP: 1, MeshAxis.TP: 0}
    assert [d.data_rank(r) for r in range(8)] == list(range(8))


def test_seed_scenarios_16_ranks():
    a, b = ParallelDims(dp=8, ep=2), ParallelDims(dp=2, ep=8)
    assert a.world_size == b.world_size == 16
    assert a.groups(MeshAxis.EP)[0] == [0, 1] and len(a.groups(MeshAxis.EP)) == 8
    assert b.groups(MeshAxis.EP)[1] == list(range(8, 16))
    assert b.groups(MeshAxis.DP)[3] == [3, 11]


def test_coords_round_trip_with_all_axes():
    d = ParallelDims(dp=2, ep=3, tp=2, pp=2)
    for r in range(d.world_size):
        assert d.rank_of(d.coords(r)) == r
    # tp innermost, pp outermost
    assert d.groups(MeshAxis.TP)[0] == [0, 1]
    assert d.groups(MeshAxis.PP)[0] == [0, 12]


def test_padded_vocab_rounds_up_to_the_tp_degree():
    assert padded_vocab(50257, 4) == 50260 and padded_vocab(8, 4) == 8 and padded_vocab(7, 1) == 7


def test_ep_nodes_only_where_the_group_splits_evenly():
    assert ParallelDims(ep=2).ep_nodes(8) == 1
    assert ParallelDims(ep=8, tp=2).ep_nodes(8) == 2  # 4 EP ranks of the group per node
    assert ParallelDims(ep=3).ep_nodes(4) is None  # groups of 3 straddle nodes of 4
    assert ParallelDims(ep=3).ep_nodes(2) is None  # 3 ranks over nodes of 2
    assert ParallelDims(ep=2, tp=2).ep_nodes(3) is None  # tp peers split across nodes
