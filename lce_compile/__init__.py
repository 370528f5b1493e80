"""lce_compile: fused "output layer + loss" functions that never hold the (tokens x vocab) logits."""
from .losses import (AuxOutput, AuxRequest, LinearCrossEntropyLoss, LinearKDLoss, linear_cross_entropy,
                     linear_kd_loss)
from .policy import FusedOptions
from .wrap import FusedLoss, fused_loss

__version__ = "0.1.0"
__all__ = ["AuxOutput", "AuxRequest", "FusedLoss", "FusedOptions", "LinearCrossEntropyLoss", "LinearKDLoss",
           "fused_loss", "linear_cross_entropy", "linear_kd_loss"]
