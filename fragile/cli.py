"""nanoGPT-style configuration: UPPER_CASE constants in a script's header, overridable by CLI flags.

A script declares its hyperparameters as plain constants, then calls
``apply_overrides(globals(), __doc__)``; every constant becomes a ``--lower-dashed`` flag
whose default is the header's value. Editing the header and passing flags are equivalent.
"""
import argparse
import os
import sys
import traceback


class UserError(Exception):
    """A bad input the user can fix: reported as one line, never as a traceback."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error:`` line (and exit 2) rather than usage plus error."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _is_config_name(name, value):
    return name.isupper() and not name.startswith("_") and isinstance(value, (bool, int, float, str, list, tuple))


def _flag(name):
    return "--" + name.lower().replace("_", "-")


def build_parser(namespace, description=None, choices=None):
    """An argparse parser with one flag per UPPER_CASE constant in ``namespace``."""
    choices = choices or {}
    parser = OneLineErrorParser(description=(description or "").strip().splitlines()[0] if description else None,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, value in namespace.items():
        if not _is_config_name(name, value):
            continue
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


INTERRUPTED_NOTHING_SAVED = "interrupted; nothing was saved (outputs are written only when complete)"


def _report(message, error=None):
    """One ``error:`` line; under torchrun (its variables set), from the failing rank only
    (fragile.distributed.report, imported only there: scripts without torch stay light)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from .distributed import report
        report(f"error: {message}", error)
    else:
        print(f"error: {message}", file=sys.stderr)


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
