from ._aux import AuxOutput, AuxRequest
from .cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy
from .distillation import LinearKDLoss, linear_kd_loss
from .dpo import LinearDPOLoss, linear_dpo_loss
from .grpo import LinearGRPOLoss, linear_grpo_loss
from .logprobs import LinearTokenLogprobs, linear_token_logprobs

__all__ = ["AuxOutput", "AuxRequest", "LinearCrossEntropyLoss", "LinearDPOLoss", "LinearGRPOLoss", "LinearKDLoss",
           "LinearTokenLogprobs", "linear_cross_entropy", "linear_dpo_loss", "linear_grpo_loss", "linear_kd_loss",
           "linear_token_logprobs"]
