"""nanoGPT-style configuration: UPPER_CASE constants in a script's header, overridable by CLI flags.

A script declares its hyperparameters as plain constants, then calls
``apply_overrides(globals(), __doc__)``; every constant becomes a ``--lower-dashed`` flag
whose default is the header's value. Editing the header and passing flags are equivalent. A comment
line of its own in the header starts a group of ``--help`` (``# poison: BadNets``); a constant's
trailing comment is its help text.

Library code never reads a script's constants by name: each attack and trigger method declares its
parameters once, as a dataclass, and the script builds it from its constants by name
(``NoiseParams(sigmas=NOISE_SIGMAS, ...)``), so grep finds a setting's definition and its use in one hop.
Also here: the checks scripts run on their numbers before any work, the one-line error contract
(``UserError``, ``run_main``) and progress bars.
"""
import argparse
import ast
import io
import math
import os
import signal
import subprocess
import sys
import time
import tokenize
import traceback


class UserError(Exception):
    """A bad input the user can fix: reported as one line, never as a traceback."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error:`` line (and exit 2) rather than usage plus error."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def check_range(flag, value, low=-math.inf, high=math.inf, low_open=False, high_open=False):
    """``value`` of ``flag``: a finite number in [low, high] (an open end excluded), or one error line naming the flag
    and the range. Scripts check their numbers with it before any work starts."""
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or below or above:
        if math.isinf(high):
            bound = f"{'above' if low_open else 'at least'} {low:g}"
        elif math.isinf(low):
            bound = f"{'below' if high_open else 'at most'} {high:g}"
        else:
            bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UserError(f"{flag} must be {bound}, got {value!r}")
    return value


def check_nonempty(flag, values):
    """A list flag that needs at least one value (``--seeds`` with nothing after it)."""
    if not values:
        raise UserError(f"{flag} needs at least one value")
    return values


def check_positive_int(flag, value):
    """A count that must be a positive integer (trials, steps, images)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{flag} must be a positive integer, got {value!r}")
    return value


def check_sweep(flag, values, low=0.0, high=math.inf):
    """A sweep: a non-empty list of numbers in [low, high]."""
    check_nonempty(flag, values)
    bad = [v for v in values if not low <= v <= high]
    if bad:
        raise UserError(f"{flag} values must lie in [{low:g}, {high:g}], got {bad[0]!r}")
    return values


def check_choices(flag, values, allowed):
    """A non-empty list whose every entry is one of ``allowed``."""
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise UserError(f"{flag}: choose from {', '.join(allowed)} (got {unknown or 'none'})")
    return values


def _is_config_name(name, value):
    return name.isupper() and not name.startswith("_") and isinstance(value, (bool, int, float, str, list, tuple))


def header_constants(namespace):
    """The names of a script's header constants: the UPPER_CASE assignments above its first import (so that a
    constant the script imports, or defines further down, is never mistaken for a setting). A namespace that is
    not a script's (no ``__file__``: a test's dict) counts every UPPER_CASE name holding a plain value."""
    return [name for name, _, _ in header_layout(namespace)]


def header_layout(namespace):
    """(name, --help group, help text) of every header constant, in order: the group is the last comment line
    of its own above it, the help text its trailing comment (and the comment lines that continue it)."""
    path = namespace.get("__file__")
    if not path or not os.path.exists(path):
        return [(name, None, "") for name, value in namespace.items() if _is_config_name(name, value)]
    with open(path) as f:
        source = f.read()
    tree = ast.parse(source, path)
    end = next((node.lineno for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))), math.inf)
    comments = {token.start[0]: (token.start[1], token.string.lstrip("#").strip())
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT and token.start[0] < end}
    assignments = {node.lineno: node.targets[0].id for node in tree.body
                   if node.lineno < end and isinstance(node, ast.Assign) and len(node.targets) == 1
                   and isinstance(node.targets[0], ast.Name) and _is_config_name(node.targets[0].id,
                                                                                   namespace.get(node.targets[0].id))}
    layout, group, last = [], None, None
    for line in sorted(set(comments) | set(assignments)):
        if line in assignments:
            last = [assignments[line], group, comments[line][1] if line in comments else ""]   # its trailing comment
            layout.append(last)
        elif comments[line][0] == 0:   # a comment line of its own: a section (the config rulers are not)
            text = comments[line][1]
            group = None if text.startswith("-") else text
            last = None
        elif last is not None:   # an indented comment line continues the help text above it
            last[2] = f"{last[2]} {comments[line][1]}".strip()
    return [tuple(entry) for entry in layout]


def _flag(name):
    return "--" + name.lower().replace("_", "-")


def build_parser(namespace, description=None, choices=None):
    """An argparse parser with one flag per header constant in ``namespace``, in the header's groups."""
    choices = choices or {}
    parser = OneLineErrorParser(description=(description or "").strip().splitlines()[0] if description else None,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {}
    for name, group, text in header_layout(namespace):
        value = namespace[name]
        if group not in groups:
            groups[group] = parser if group is None else parser.add_argument_group(group)
        kwargs = dict(dest=name, default=value, help=text.replace("%", "%%") or "(default: %(default)s)")
        if name in choices:
            kwargs["choices"] = choices[name]
        if isinstance(value, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(value, (list, tuple)):
            kwargs["nargs"] = "*"
            kwargs["type"] = type(value[0]) if value else str
        else:
            kwargs["type"] = type(value)
        groups[group].add_argument(_flag(name), **kwargs)
    return parser


def apply_overrides(namespace, description=None, choices=None, argv=None):
    """Parse CLI flags and write the overridden values back into the script's globals."""
    parser = build_parser(namespace, description, choices)
    args = parser.parse_args(argv)
    for name, value in vars(args).items():
        namespace[name] = list(value) if isinstance(value, tuple) else value
    # Parsed again with every default suppressed, the result holds only the flags the user typed; kept (as a
    # private name, never a setting) for apply_preset.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    namespace["_FLAGS_GIVEN"] = frozenset(vars(parser.parse_args(argv)))
    return {name: namespace[name] for name in vars(args)}


def apply_preset(namespace, config, values):
    """Fill a script's constants from a preset (a recipe), except those passed explicitly as flags:
    ``--recipe fast --lr 0.2`` takes the fast recipe with that learning rate."""
    for name, value in values.items():
        if name not in namespace.get("_FLAGS_GIVEN", ()):
            namespace[name] = config[name] = value
    return config


def progress_bar(iterable, total=None, desc=None, enabled=True):
    """tqdm, switched off (tests, logs) without changing the loop."""
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


INTERRUPTED_NOTHING_SAVED = "interrupted; nothing was saved (outputs are written only when complete)"


GRACE_S = 5.0   # under torchrun, a rank other than 0 waits this long for torchrun's SIGTERM before reporting


def lost_contact(error):
    """True for an error of the communication itself (a peer gone), not of this rank's own work."""
    import torch.distributed   # only under torchrun: scripts without torch stay light
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error)
    return any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "NCCL error"))


def _report(message, error=None):
    """One ``error:`` line. Under torchrun (its variables set) the line names the rank; a rank other than 0
    (and any rank that lost contact with the others) first gives torchrun a moment to stop it, so an error
    every rank hits (a bad flag) is printed once, by rank 0, and the ranks that lost a failed peer stay
    quiet."""
    line = f"error: {message}"
    if all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        me, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world > 1 and (me != 0 or lost_contact(error)):
            time.sleep(GRACE_S)   # torchrun's SIGTERM raises SystemExit here when another rank failed first
        line = line.replace("error: ", f"error: rank {me} of {world}: ", 1)
    print(line.splitlines()[0], file=sys.stderr, flush=True)


def first_line(error):
    """An exception's message cut to its first line (its type's name when it has none): what an error line quotes
    of a library's multi-line complaint."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_sigint_seen = []


def _on_sigint(signum, frame):
    _sigint_seen.append(signum)
    raise KeyboardInterrupt


def watch_for_ctrl_c():
    """Python's own Ctrl-C handler, which also notes that Ctrl-C came. Why: a KeyboardInterrupt raised inside a
    callback of torch's C++ (torch.save writing, torch.load reading) comes out as a RuntimeError, which must still
    read as "interrupted", not as a bug. Where SIGINT is ignored (a background job) it stays ignored."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def run_main(main, error_exit_code=2, interrupted=INTERRUPTED_NOTHING_SAVED):
    """Run a script's ``main``: user errors become one ``error:`` line and a non-zero exit.
    ``interrupted`` is what Ctrl-C tells the user: each script says what it kept and how to go on."""
    watch_for_ctrl_c()
    try:
        code = main()
    except KeyboardInterrupt:
        _report(interrupted)
        sys.exit(130)
    except Exception as e:
        if _sigint_seen:   # the interrupt came out of torch's C++ as another error: Ctrl-C is the cause
            _report(interrupted)
            sys.exit(130)
        if isinstance(e, UserError):
            _report(e)
        else:  # an unexpected bug: still one line, with the full trace on demand
            _report(f"{type(e).__name__}: {e} (set FRAGILE_DEBUG=1 for the traceback)", e)
            if os.environ.get("FRAGILE_DEBUG"):
                traceback.print_exc()
        sys.exit(error_exit_code)
    sys.exit(code or 0)


def run_logged(root, script, args, log, threads, what):
    """Run the suite's ``script`` (a path under ``root``) as a user would, with ``threads`` threads, its output
    written to ``log``; returns its wall seconds. A failure is one error line naming ``what``, the exit code, the
    log's last line and the log, for the drivers that chain the suite's scripts (spread, field bench)."""
    os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": root}
    started = time.time()
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, os.path.join(root, script), *map(str, args)], cwd=root, stdout=f,
                               stderr=subprocess.STDOUT, env=env)
    if code != 0:
        last = open(log).read().strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"{what} failed (exit {code}): {last[0]} (log: {log}); rerun to resume")
    return round(time.time() - started, 1)
