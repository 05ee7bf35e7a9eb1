"""A judge for tests/stages/test_eval_row_fields.py: each response's score is its prompt row's `answer`."""


def the_answer(prompts, responses, answer):
    return [float(a) for a in answer]
