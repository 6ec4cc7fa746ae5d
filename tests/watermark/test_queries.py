"""The statistics of a verdict: p-values, queries until the tampering shows, top-1 margins."""
import pytest
import torch

from fragile.watermark.queries import chance_p_value, compare, expected_queries, queries_to_detection, top2_margins


def test_queries_to_detection_count_from_one_in_the_given_order():
    mask = torch.tensor([False, False, True, False, True])
    assert queries_to_detection(mask, torch.tensor([0, 1, 2, 3, 4])) == 3
    assert queries_to_detection(mask, [4, 0, 1, 2, 3]) == 1
    assert queries_to_detection(mask, [4, 0, 1, 2, 3], max_mismatches=1) == 4   # tolerance: second mismatch
    assert queries_to_detection(torch.zeros(5, dtype=torch.bool), torch.arange(5)) is None


def test_expected_queries_average_over_random_orders():
    assert expected_queries(0, 100) is None and expected_queries(100, 100) == 1.0
    assert expected_queries(75, 100) == pytest.approx(101 / 76)
    assert expected_queries(1, 5) == 3.0 and expected_queries(1, 5, max_mismatches=1) is None
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[:4] = True
    mean = sum(queries_to_detection(mask, torch.randperm(20, generator=gen)) for _ in range(4000)) / 4000
    assert mean == pytest.approx(expected_queries(4, 20), rel=0.03)   # the formula is the realized mean


def test_the_report_follows_the_recorded_query_order():
    key, returned = [0, 1, 2, 3], [0, 1, 9, 3]
    assert compare(returned, key, 10, order=[2, 0, 1, 3])["queries_to_first_mismatch"] == 1
    assert compare(returned, key, 10, order=[0, 1, 3, 2])["queries_to_first_mismatch"] == 4
    assert compare(returned, key, 10, order=[3, 2, 1, 0])["queries_to_first_mismatch"] == 2
    assert compare(returned, key, 10)["queries_to_first_mismatch"] is None
    assert compare(key, key, 10, order=[0, 1, 2, 3])["queries_to_first_mismatch"] is None
    report = compare(returned, key, 10, max_mismatches=1)
    assert report["verdict"] == "intact" and report["mismatches"] == [{"index": 2, "expected": 2, "returned": 9}]


def test_p_value_and_margins():
    assert chance_p_value(0, 10, 10) == 1.0
    assert chance_p_value(10, 10, 10) == pytest.approx(1e-10)
    assert top2_margins(torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0]])).tolist() == [0.5, 3.0]


def test_compare_refuses_a_verdict_on_fewer_or_more_labels_than_triggers():
    from fragile.core.cli import UserError
    with pytest.raises(UserError, match="0 labels came back for 3 triggers"):
        compare([], [1, 2, 3], 10)
    with pytest.raises(UserError, match="4 labels came back"):
        compare([1, 2, 3, 4], [1, 2, 3], 10)


@pytest.mark.parametrize("tolerance", [-1, 3, 1000])
def test_a_tolerance_that_decides_nothing_is_refused(tolerance):
    from fragile.core.cli import UserError
    with pytest.raises(UserError, match="--max-mismatches must be an integer in 0..2"):
        compare([1, 2, 3], [1, 2, 3], 10, max_mismatches=tolerance)


@pytest.mark.parametrize("order", [[0, 1], [0, 1, 1], [0, 1, 5], "012"])
def test_a_query_order_that_is_not_a_permutation_is_refused(order):
    from fragile.core.cli import UserError
    with pytest.raises(UserError, match="not a permutation"):
        compare([1, 2, 3], [1, 2, 3], 10, order=order)
