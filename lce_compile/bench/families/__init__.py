"""The loss families the benchmark compares, ``--loss name -> Family``: each is one definition of its extra
inputs, its reference formula and its methods (ce.py, kd.py; rl.py holds GRPO, DPO and the token log-probs,
which share the unfused log-prob code). To add a method, add it to its family's ``methods``; to add a loss,
define a ``Family`` and list it here."""
from .base import IGNORE_INDEX, Family, Method
from .ce import CE
from .kd import KD
from .rl import DPO, GRPO, LOGPROBS

FAMILIES = {family.name: family for family in (CE, KD, GRPO, DPO, LOGPROBS)}

__all__ = ["FAMILIES", "IGNORE_INDEX", "Family", "Method"]
