"""tqdm progress bars that can be switched off (tests, logs) without changing the loop."""
from tqdm.auto import tqdm


def progress_bar(iterable, total=None, desc=None, enabled=True):
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)
