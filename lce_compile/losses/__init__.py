from .cross_entropy import AuxOutput, AuxRequest, LinearCrossEntropyLoss, linear_cross_entropy
from .distillation import LinearKDLoss, linear_kd_loss

__all__ = ["AuxOutput", "AuxRequest", "LinearCrossEntropyLoss", "LinearKDLoss", "linear_cross_entropy",
           "linear_kd_loss"]
