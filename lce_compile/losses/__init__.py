from .cross_entropy import AuxOutput, AuxRequest, LinearCrossEntropyLoss, linear_cross_entropy

__all__ = ["AuxOutput", "AuxRequest", "LinearCrossEntropyLoss", "linear_cross_entropy"]
