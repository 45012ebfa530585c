"""N:M sparsity: weight masks, activation and gradient N:M in training."""
from thrifty.sparse.actgrad import ActNM, ActNMMask, GradNM, GradNMTransform, parse_nm

__all__ = ["ActNM", "ActNMMask", "GradNM", "GradNMTransform", "parse_nm"]
