"""DVC's output turned into one line that says why a command failed (no DVC run needed)."""

from __future__ import annotations

from gist_core.versioning import dvc_failure


def test_a_stage_commands_own_error_comes_first_then_dvcs() -> None:
    output = (
        "Running stage 'mine':\n> gist data --step mine\n"
        "error: data/raw/x.csv: classification data file not found (data.classification 'X')\n"
        "ERROR: failed to reproduce 'mine': failed to run: gist data --step mine, exited with 1\n"
    )
    assert dvc_failure(output) == (
        "data/raw/x.csv: classification data file not found (data.classification 'X'); "
        "failed to reproduce 'mine': failed to run: gist data --step mine, exited with 1"
    )


def test_progress_bars_and_repeats_do_not_make_it_longer() -> None:
    output = (
        "Collecting |0.00 [00:00, ?entry/s]\rPushing\r"
        "ERROR: unexpected error - Forbidden: An error occurred (403) when calling the HeadObject operation\n"
        "ERROR: unexpected error - Forbidden: An error occurred (403) when calling the HeadObject operation\n"
    )
    assert (
        dvc_failure(output)
        == "unexpected error - Forbidden: An error occurred (403) when calling the HeadObject operation"
    )


def test_without_an_error_line_the_last_line_is_the_reason() -> None:
    assert dvc_failure("one\ntwo\n\n") == "two"
    assert dvc_failure("") == "no output"
