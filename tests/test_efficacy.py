"""Paired differences over seeds (distill.tools.stats), as the efficacy study reports them."""

import math

import pytest

from distill.tools.stats import paired_difference

T_975_2DOF = 4.302652729911275  # Student's t, 97.5 % quantile, 2 degrees of freedom (tables: 4.303)


def test_paired_difference_is_the_mean_of_per_seed_differences_with_a_t_interval():
    a = {0: 81.0, 1: 83.0, 2: 85.5, 7: 99.0}  # seed 7 has no partner: ignored
    b = {0: 80.0, 1: 81.0, 2: 82.5}
    diff = paired_difference(a, b)
    # differences 1, 2, 3: mean 2, sample std 1, half-width t(0.975, 2) · 1 / √3
    half = T_975_2DOF / math.sqrt(3)
    assert diff.n == 3 and diff.mean == pytest.approx(2.0)
    assert (diff.low, diff.high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert not diff.resolved  # 2 − 2.48 < 0
    assert str(diff) == "+2.00 [-0.48, +4.48]"


def test_a_difference_is_resolved_when_its_interval_excludes_zero():
    assert paired_difference({0: 3.0, 1: 3.1, 2: 2.9}, {0: 1.0, 1: 1.0, 2: 1.0}).resolved
    assert paired_difference({0: 1.0, 1: 1.0, 2: 1.0}, {0: 3.0, 1: 3.1, 2: 2.9}).resolved
    with pytest.raises(ValueError, match=r"at least 2 shared seeds, got \[0\]"):
        paired_difference({0: 1.0, 1: 2.0}, {0: 1.0})


def test_demo_table_gives_differences_in_test_images_and_marks_those_under_one_as_unresolved():
    from distill.demo import demo_table, in_images

    assert in_images(100 * 12 / 359, 359) == "+3.34 (+12 images)"
    assert in_images(-100 / 359, 359) == "-0.28 (-1 image)"
    assert in_images(0.0, 359) == "+0.00 (< 1 image: unresolved)"
    assert in_images(-1e-12, 359) == "+0.00 (< 1 image: unresolved)"  # no negative zero
    top1 = {"teacher": 99.0, "student": 90.0, "kd": 92.0, "pwkd": 92.0, "pwkd_whole_only": 91.5}
    lines = demo_table(top1, 200).splitlines()
    assert lines[0] == "| network | test top-1 (%) | Δ vs student from scratch | Δ vs its control |"
    assert "| teacher (resnet20) | 99.00 |  |  |" in lines and "| KD | 92.00 | +2.00 (+4 images) |  |" in lines
    assert "| student from scratch (resnet8), seed 0 | 90.00 |  |  |" in lines
    assert "| PWKD:KD | 92.00 | +2.00 (+4 images) | +0.50 (+1 image) |" in lines
    assert lines[-1] == "| PWKD:KD whole only (control) | 91.50 | +1.50 (+3 images) |  |"


def test_demo_compares_every_method_with_the_mean_of_the_students_seeds_and_their_range_is_unresolved():
    from distill.demo import demo_table

    # students 89, 90, 94: mean 91, range 89–94; 200 test images, one image = 0.5 points
    top1 = {"student": 90.0, "student_seed1": 89.0, "student_seed2": 94.0, "kd": 95.0, "sskd": 90.5, "dml": 91.2}
    lines = demo_table(top1, 200).splitlines()
    assert "| student from scratch (resnet8), seeds 0, 1, 2 | 91.00 (89.00–94.00) |  |  |" in lines
    assert not any("student_seed" in line or line.startswith("| student from scratch (resnet8) |") for line in lines)
    assert "| KD | 95.00 | +4.00 (+8 images) |  |" in lines  # above the range: resolved at this noise floor
    assert "| SSKD | 90.50 | -0.50 (-1 image: inside the from-scratch seeds' range, unresolved) |  |" in lines
    assert "| DML | 91.20 | +0.20 (< 1 image: unresolved) |  |" in lines


def test_demo_refuses_fewer_epochs_than_sskd_and_pwkd_have_stages_before_training_anything(tmp_path, capsys):
    from distill.demo import main

    with pytest.raises(SystemExit):
        main(["--epochs", "3", "--out", str(tmp_path)])
    assert "--epochs 3: expected at least 4, one for each of SSKD's and PWKD's stages" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
