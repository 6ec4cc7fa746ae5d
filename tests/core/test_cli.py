"""Script headers as flags (grouped --help with each constant's comment), recipes over them, and the checks
scripts run on their numbers."""
import os
import textwrap

import pytest

from fragile.core.cli import UserError, apply_overrides, apply_preset, header_constants, run_main


def test_a_preset_never_overrides_a_flag_the_user_typed():
    namespace = {"RECIPE": "paper", "LR": 0.1, "BATCH_SIZE": 128, "SCHEDULE": "cosine"}
    config = apply_overrides(namespace, argv=["--recipe", "fast", "--lr", "0.05"])
    apply_preset(namespace, config, {"LR": 0.4, "BATCH_SIZE": 512, "SCHEDULE": "onecycle"})
    assert (namespace["LR"], namespace["BATCH_SIZE"], namespace["SCHEDULE"]) == (0.05, 512, "onecycle")
    assert config == {"RECIPE": "fast", "LR": 0.05, "BATCH_SIZE": 512, "SCHEDULE": "onecycle"}


def test_help_is_grouped_by_the_headers_sections_with_each_constants_comment(tmp_path, capsys):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent('''\
        """A script."""
        # ----------------------------------------------------------------------------- config
        SEED = 0                   # which run
        # noise (the tamper wing)
        NOISE_SIGMAS = [1e-3]      # std of the Gaussian, absolute:
                                   # on every weight
        NOISE_TRIALS = 20
        # -----------------------------------------------------------------------------
        import os
    '''))
    namespace = {"__file__": str(script), "SEED": 0, "NOISE_SIGMAS": [1e-3], "NOISE_TRIALS": 20}
    with pytest.raises(SystemExit):
        apply_overrides(namespace, argv=["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--seed SEED which run (default: 0)" in text
    group = text.index("noise (the tamper wing):")
    assert text.rindex("--noise-sigmas") > group > text.rindex("--seed SEED")
    assert "std of the Gaussian, absolute: on every weight (default: [0.001])" in text
    assert "--noise-trials NOISE_TRIALS (default: 20)" in text


@pytest.mark.parametrize("check, args, message", [
    ("check_positive_int", ("--trials", 0), "--trials must be a positive integer, got 0"),
    ("check_positive_int", ("--trials", True), "--trials must be a positive integer"),
    ("check_sweep", ("--sigmas", []), "--sigmas needs at least one value"),
    ("check_sweep", ("--ratios", [0.5, 2.0], 0, 1), r"--ratios values must lie in \[0, 1\], got 2.0"),
    ("check_choices", ("--modes", ["int4"], ["fp16", "int8"]), "--modes: choose from fp16, int8"),
])
def test_the_checks_name_the_flag_and_what_it_must_be(check, args, message):
    import fragile.core.cli as cli
    with pytest.raises(UserError, match=message):
        getattr(cli, check)(*args)


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



def test_ctrl_c_inside_torch_save_reads_as_interrupted_not_as_a_bug(capsys):
    """torch.save's C++ writer turns a KeyboardInterrupt raised in its write callback into a RuntimeError: the user
    still gets the script's "interrupted" line and exit 130 (a bug would be exit 2)."""
    import io
    import signal
    import torch
    from fragile.core import cli

    class CtrlCOnFirstWrite(io.BytesIO):
        def write(self, data):
            os.kill(os.getpid(), signal.SIGINT)
            return super().write(data)

    def main():
        torch.save({"weights": torch.zeros(8)}, CtrlCOnFirstWrite())
    try:
        with pytest.raises(SystemExit) as exit_:
            run_main(main, interrupted="interrupted; kept what was there")
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        cli._sigint_seen.clear()
    assert exit_.value.code == 130 and capsys.readouterr().err == "error: interrupted; kept what was there\n"

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
