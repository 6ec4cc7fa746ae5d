"""Script headers as flags, recipes over them, and parameter dataclasses filled from a header."""
import dataclasses
import textwrap
from dataclasses import dataclass, field

import pytest

from fragile.core.cli import (UserError, apply_overrides, apply_preset, flag_of, from_header, header_constants,
                              header_names, run_main)


@dataclass(frozen=True)
class Inner:
    HEADER_PREFIX = "INNER_"
    steps: int
    seed: int = field(metadata={"header": "SHARED_SEED"})


@dataclass(frozen=True)
class Outer:
    HEADER_PREFIX = "OUTER_"
    sigmas: list
    inner: Inner


def test_a_preset_never_overrides_a_flag_the_user_typed():
    namespace = {"RECIPE": "paper", "LR": 0.1, "BATCH_SIZE": 128, "SCHEDULE": "cosine"}
    config = apply_overrides(namespace, argv=["--recipe", "fast", "--lr", "0.05"])
    apply_preset(namespace, config, {"LR": 0.4, "BATCH_SIZE": 512, "SCHEDULE": "onecycle"})
    assert (namespace["LR"], namespace["BATCH_SIZE"], namespace["SCHEDULE"]) == (0.05, 512, "onecycle")
    assert config == {"RECIPE": "fast", "LR": 0.05, "BATCH_SIZE": 512, "SCHEDULE": "onecycle"}


def test_from_header_fills_prefixed_shared_and_nested_fields():
    header = {"OUTER_SIGMAS": (1e-3, 1e-2), "INNER_STEPS": 7, "SHARED_SEED": 3, "OTHER": 1}
    params = from_header(Outer, header)
    assert params == Outer(sigmas=[1e-3, 1e-2], inner=Inner(steps=7, seed=3))   # tuples arrive as lists
    assert header_names(Outer) == {"OUTER_SIGMAS", "INNER_STEPS", "SHARED_SEED"}
    assert flag_of(Inner, "seed") == "--shared-seed" and flag_of(Outer, "sigmas") == "--outer-sigmas"
    with pytest.raises(KeyError):
        from_header(Outer, {"OUTER_SIGMAS": [1.0]})   # a header that lacks a field is a bug, not a default
    flags = apply_overrides(dict(header), argv=["--inner-steps", "9"])
    assert from_header(Outer, flags).inner.steps == 9


def test_only_the_constants_above_the_imports_are_settings(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent('''\
        """A script."""
        EPOCHS = 3
        NAMES = ["a", "b"]
        # -----
        import os
        from string import ascii_letters as LETTERS
        LATER = (1, 2)
    '''))
    namespace = {"__file__": str(script), "EPOCHS": 3, "NAMES": ["a", "b"], "LETTERS": "abc", "LATER": (1, 2)}
    assert header_constants(namespace) == ["EPOCHS", "NAMES"]
    config = apply_overrides(namespace, argv=["--epochs", "5"])
    assert config == {"EPOCHS": 5, "NAMES": ["a", "b"]}
    with pytest.raises(SystemExit):
        apply_overrides(namespace, argv=["--later", "1"])


def test_a_user_error_is_one_line_and_exit_2(capsys):
    def main():
        raise UserError("bad input")
    with pytest.raises(SystemExit) as exit_:
        run_main(main)
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: bad input\n"


def test_parameter_classes_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Inner(steps=1, seed=0).steps = 2


@pytest.mark.parametrize("value, low, high, kwargs, ok", [
    (1, 1, float("inf"), {}, True), (0, 1, float("inf"), {}, False), (-1, 0, float("inf"), {}, False),
    (float("inf"), 0, 3600, {"low_open": True}, False), (float("nan"), 0, 1, {}, False),
    (0.0, 0, 1, {"low_open": True}, False), (1.0, 0, 1, {"high_open": True}, False), (True, 0, 5, {}, False),
])
def test_check_range_refuses_what_lies_outside_naming_the_flag(value, low, high, kwargs, ok):
    from fragile.core.cli import check_range
    if ok:
        assert check_range("--batch-size", value, low, high, **kwargs) == value
    else:
        with pytest.raises(UserError, match=r"^--batch-size must be"):
            check_range("--batch-size", value, low, high, **kwargs)


def test_check_nonempty_refuses_an_empty_list():
    from fragile.core.cli import check_nonempty
    with pytest.raises(UserError, match="--seeds needs at least one value"):
        check_nonempty("--seeds", [])
