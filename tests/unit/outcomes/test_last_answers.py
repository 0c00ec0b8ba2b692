"""The slopes route's memory of its last fit per group: reused only at the same generation and
projection position (the same rows), forgotten once anything was applied."""

from services.outcomes.api import LastAnswers


def test_an_answer_is_reused_only_at_the_same_generation_and_position() -> None:
    answers = LastAnswers()
    answers.put(("A", 1, "enrollment:3,pulse:2,cells:0,labs:9"), {"total": 1})
    assert answers.get(("A", 1, "enrollment:3,pulse:2,cells:0,labs:9")) == {"total": 1}
    assert answers.get(("A", 1, "enrollment:3,pulse:2,cells:0,labs:10")) is None  # a result arrived
    assert answers.get(("A", 2, "enrollment:3,pulse:2,cells:0,labs:9")) is None  # rebuilt
    assert answers.get(("B", 1, "enrollment:3,pulse:2,cells:0,labs:9")) is None
    answers.put(("A", 1, "enrollment:3,pulse:2,cells:0,labs:10"), {"total": 2})
    assert answers.get(("A", 1, "enrollment:3,pulse:2,cells:0,labs:9")) is None  # one answer per group kept
