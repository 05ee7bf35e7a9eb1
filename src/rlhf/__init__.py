"""rlhf: the classic RLHF pipeline (SFT -> reward model -> PPO | DPO | ORPO).

Nothing heavy is imported here, so `import rlhf.config` stays cheap.
"""

__version__ = "0.1.0"
