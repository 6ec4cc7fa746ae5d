"""nanoGPT-style configuration: UPPER_CASE constants in a script's header, overridable by CLI flags.

A script declares its hyperparameters as plain constants, then calls
``apply_overrides(globals(), __doc__)``; every constant becomes a ``--lower-dashed`` flag
whose default is the header's value. Editing the header and passing flags are equivalent.
"""
import argparse
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
    args = build_parser(namespace, description, choices).parse_args(argv)
    for name, value in vars(args).items():
        namespace[name] = list(value) if isinstance(value, tuple) else value
    return {name: namespace[name] for name in vars(args)}


def run_main(main, error_exit_code=2):
    """Run a script's ``main``: user errors become one ``error:`` line and a non-zero exit."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(error_exit_code)
    except KeyboardInterrupt:
        print("error: interrupted (completed work was saved; rerun with the same flags to resume)", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # an unexpected bug: still one line, with the full trace on demand
        print(f"error: {type(e).__name__}: {e} (set FRAGILE_DEBUG=1 for the traceback)", file=sys.stderr)
        import os
        if os.environ.get("FRAGILE_DEBUG"):
            traceback.print_exc()
        sys.exit(error_exit_code)
    sys.exit(code or 0)
