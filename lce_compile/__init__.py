"""lce_compile: fused "output layer + loss" functions that never hold the (tokens x vocab) logits."""
from .losses import (AuxOutput, AuxRequest, LinearCrossEntropyLoss, LinearDPOLoss, LinearGRPOLoss, LinearKDLoss,
                     LinearTokenLogprobs, linear_cross_entropy, linear_dpo_loss, linear_grpo_loss, linear_kd_loss,
                     linear_token_logprobs)
from .policy import FusedOptions
from .wrap import FusedLoss, fused_loss

__version__ = "0.1.0"
__all__ = ["AuxOutput", "AuxRequest", "FusedLoss", "FusedOptions", "LinearCrossEntropyLoss", "LinearDPOLoss",
           "LinearGRPOLoss", "LinearKDLoss", "LinearTokenLogprobs", "fused_loss", "linear_cross_entropy",
           "linear_dpo_loss", "linear_grpo_loss", "linear_kd_loss", "linear_token_logprobs"]
