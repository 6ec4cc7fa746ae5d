"""nanoGPT-style configuration: UPPER_CASE constants in a script's header, overridable by CLI flags.

A script declares its hyperparameters as plain constants, then calls
``apply_overrides(globals(), __doc__)``; every constant becomes a ``--lower-dashed`` flag
whose default is the header's value. Editing the header and passing flags are equivalent.

Library code never reads a script's constants by name: each attack and trigger method declares its
parameters once, as a dataclass, and ``from_header`` fills one from the header (``MARGIN_STEPS`` ->
``MarginParams.steps``). Also here: the one-line error contract (``UserError``, ``run_main``) and progress bars.
"""
import argparse
import ast
import dataclasses
import math
import os
import sys
import time
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


def _is_config_name(name, value):
    return name.isupper() and not name.startswith("_") and isinstance(value, (bool, int, float, str, list, tuple))


def header_constants(namespace):
    """The names of a script's header constants: the UPPER_CASE assignments above its first import (so that a
    constant the script imports, or defines further down, is never mistaken for a setting). A namespace that is
    not a script's (no ``__file__``: a test's dict) counts every UPPER_CASE name holding a plain value."""
    path = namespace.get("__file__")
    if not path or not os.path.exists(path):
        return [name for name, value in namespace.items() if _is_config_name(name, value)]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if _is_config_name(name, namespace.get(name)):
                names.append(name)
    return names


def _flag(name):
    return "--" + name.lower().replace("_", "-")


def build_parser(namespace, description=None, choices=None):
    """An argparse parser with one flag per UPPER_CASE constant in ``namespace``."""
    choices = choices or {}
    parser = OneLineErrorParser(description=(description or "").strip().splitlines()[0] if description else None,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name in header_constants(namespace):
        value = namespace[name]
        kwargs = dict(dest=name, default=value, help=" ")
        if name in choices:
            kwargs["choices"] = choices[name]
        if isinstance(value, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(value, (list, tuple)):
            kwargs["nargs"] = "*"
            kwargs["type"] = type(value[0]) if value else str
        else:
            kwargs["type"] = type(value)
        parser.add_argument(_flag(name), **kwargs)
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


def header_name(cls, field):
    """The header constant that fills ``field`` of the parameter dataclass ``cls``: ``header`` in the field's
    metadata when a constant is shared (``CONTROL_SEED``), else the class's ``HEADER_PREFIX`` + the field name."""
    return field.metadata.get("header", getattr(cls, "HEADER_PREFIX", "") + field.name.upper())


def flag_of(cls, name):
    """The command-line flag that sets field ``name`` of the parameter dataclass ``cls`` (for error lines)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return _flag(header_name(cls, field))


def from_header(cls, namespace):
    """The parameter dataclass ``cls`` filled from a script's constants (its globals after ``apply_overrides``).
    A field whose type is itself a parameter dataclass is filled the same way from the same header."""
    values = {}
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(field.type):
            values[field.name] = from_header(field.type, namespace)
        else:
            value = namespace[header_name(cls, field)]
            values[field.name] = list(value) if isinstance(value, tuple) else value
    return cls(**values)


def header_names(cls):
    """Every header constant ``from_header(cls, ...)`` reads (nested parameter classes included)."""
    names = set()
    for field in dataclasses.fields(cls):
        names |= header_names(field.type) if dataclasses.is_dataclass(field.type) else {header_name(cls, field)}
    return names


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


def run_main(main, error_exit_code=2, interrupted=INTERRUPTED_NOTHING_SAVED):
    """Run a script's ``main``: user errors become one ``error:`` line and a non-zero exit.
    ``interrupted`` is what Ctrl-C tells the user: each script says what it kept and how to go on."""
    try:
        code = main()
    except UserError as e:
        _report(e)
        sys.exit(error_exit_code)
    except KeyboardInterrupt:
        _report(interrupted)
        sys.exit(130)
    except Exception as e:  # an unexpected bug: still one line, with the full trace on demand
        _report(f"{type(e).__name__}: {e} (set FRAGILE_DEBUG=1 for the traceback)", e)
        if os.environ.get("FRAGILE_DEBUG"):
            traceback.print_exc()
        sys.exit(error_exit_code)
    sys.exit(code or 0)
