"""Numbers across seeds and trials, as the tables and figures summarize them."""
import math
import statistics


def number(value):
    """A finite int or float (not a bool, not None)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean(values):
    """Mean of the finite numbers among ``values``; None when there are none."""
    values = [float(v) for v in values if number(v)]
    return sum(values) / len(values) if values else None


def mean_std(values):
    """(mean, sample standard deviation; 0 for one value) of the values that are not None; (None, None) if none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(value, spec):
    """``value`` formatted with ``spec`` for a table cell; "-" for a missing value."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)
