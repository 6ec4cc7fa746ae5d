"""The reproduction's tables: the match rate per epoch over seeds, clean and poisoned."""
import shutil

import pytest

from fragile.core.cli import UserError
from fragile.report.reproduction import summary, trajectory_rows


def test_the_summary_has_one_row_per_epoch_over_the_seeds(trajectories, tmp_path):
    for attack in ("finetune", "poison"):
        shutil.copy(trajectories[attack], tmp_path / f"resnet8_synthetic_paper_{attack}.json")
    markdown, payload = summary(str(tmp_path))
    finetune = payload["rows"]["finetune"]
    assert [row["epoch"] for row in finetune] == [0, 1, 2] and finetune[0]["seeds"] == 2
    assert finetune[0]["match_rate"] == 1.0 and finetune[0]["match_rate_std"] == 0.0
    assert payload["rows"]["poison"][1]["attack_success_rate"] is not None and "| 2 |" in markdown
    seeds = trajectories["loaded"]["finetune"]["runs"]
    assert payload["first_detection_step"]["finetune"] == [run["first_detection_step"] for run in seeds]
    assert trajectory_rows(trajectories["loaded"]["finetune"]) == finetune


def test_a_folder_without_both_experiments_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="lacks the merged finetune and poison results"):
        summary(str(tmp_path))
