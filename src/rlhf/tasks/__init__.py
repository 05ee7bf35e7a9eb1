"""Verifiable tasks shipped with the package: a seeded question generator plus the program that checks an
answer, for a final stage with program rewards only (`ppo.rewards`) and for `rlhf eval --judge`.

- `rlhf.tasks.arithmetic`: questions such as "What is 7 plus 5?" with one numeric answer;
  `exact_number` is the reward and the judge (configs/grpo_math.yaml).
"""
