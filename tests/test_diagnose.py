"""diagnose.not_learning_message: a collapsed final evaluation gets one line, a healthy one none."""

from farcluss.diagnose import not_learning_message

NAMES = ["background", "cat", "dog", "bird", "fish"]


def test_a_run_that_predicts_one_class_is_flagged_with_the_likely_causes():
    message = not_learning_message([88.0, 0.2, 0.0, 0.5, 0.0], NAMES)
    assert message is not None
    assert "4 of 5 classes have IoU below 10" in message
    assert "only background (88.0) are predicted" in message
    for cause in ("train.epochs", "train.iterations", "data.crop_size", "model.pretrained", "train.lr"):
        assert cause in message
    assert "\n" not in message


def test_a_healthy_run_and_a_few_hard_classes_are_not_flagged():
    assert not_learning_message([90.0, 45.0, 30.0, 12.0, 3.0], NAMES) is None
    # two dead of five is below half: a hard class or two is not a collapse
    assert not_learning_message([90.0, 45.0, 30.0, 0.1, 0.3], NAMES) is None
    # the collapse issue 14 reports: background 87.7, one object 17.3, the others 0.1-6.7
    collapsed = [87.7, 17.3] + [0.1, 0.5, 1.2, 2.0, 3.3, 4.1, 5.0, 6.1, 6.7]
    assert "9 of 11 classes" in not_learning_message(collapsed, [f"c{i}" for i in range(11)])


def test_absent_classes_do_not_count_and_all_dead_is_said_plainly():
    # three present classes, two of them dead: flagged; the absent ones (None) are left out
    message = not_learning_message([80.0, None, 0.0, None, 0.4], NAMES)
    assert message is not None and "2 of 3 classes" in message
    assert "every one of 2 classes" in not_learning_message([0.0, 0.5, None, None, None], NAMES)
    assert not_learning_message([50.0, None, None, None, None], NAMES) is None
