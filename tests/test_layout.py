"""Layout validation (pure) and the single-process build."""
import pytest

from ds_twolevel.parallel.layout import TwoLevelLayout, factorizations


def test_coordinates_put_segments_on_neighbouring_ranks():
    layout = TwoLevelLayout(n=2, m=2, dp=2)
    assert [layout.coordinate(r) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]


@pytest.mark.parametrize("kwargs", [dict(n=0, m=1), dict(n=1, m=0), dict(n=2, m=2, dp=0), dict(n=1.5, m=1),
                                    dict(n=True, m=1)])
def test_bad_factors_raise(kwargs):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        TwoLevelLayout(**kwargs)


def test_world_size_must_factor():
    assert TwoLevelLayout.from_world_size(8, n=2, m=2).dp == 2
    with pytest.raises(ValueError, match=r"world size 6 is not a multiple of n\*m = 2\*2 = 4.*n=2 x m=3"):
        TwoLevelLayout.from_world_size(6, n=2, m=2)
    with pytest.raises(ValueError, match=r"needs 8 ranks but the world has 4.*dp=1 x n=2 x m=2"):
        TwoLevelLayout(n=2, m=2, dp=2).check_world(4)


def test_single_process_build_needs_no_process_group():
    mesh = TwoLevelLayout(n=1, m=1).build()
    assert (mesh.axes.i, mesh.axes.j, mesh.axes.tp.size, mesh.get_data_parallel_world_size()) == (0, 0, 1, 1)
    with pytest.raises(ValueError, match="needs 4 ranks but the world has 1"):
        TwoLevelLayout(n=2, m=2).build()


def test_factorizations_cover_world():
    assert all(d * n * m == 12 for d, n, m in factorizations(12))
    assert len(factorizations(12)) == 18


def test_sub_group_options_carry_the_timeout_in_the_backend_class():
    """DeviceMesh hands these options to new_group: their _timeout is the sub-groups' timeout, and
    NCCL refuses any class but ProcessGroupNCCL.Options (found on an H200: the generic class made
    every NCCL mesh fail). Only the gloo branch can run on a CPU-only torch."""
    import datetime

    import torch.distributed as dist

    from ds_twolevel.parallel.layout import _group_options

    timeout = datetime.timedelta(seconds=7)
    assert _group_options("gloo", timeout)._timeout == timeout
    if dist.is_nccl_available():
        from torch.distributed import ProcessGroupNCCL

        options = _group_options("nccl", timeout)
        assert isinstance(options, ProcessGroupNCCL.Options) and options._timeout == timeout
