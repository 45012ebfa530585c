"""N:M sparsity: weight masks, activation and gradient N:M in training."""
from thrifty.sparse.actgrad import ActNM, ActNMMask, GradNM, GradNMTransform, parse_nm

__all__ = ["ActNM", "ActNMMask", "GradNM", "GradNMTransform", "parse_nm"]

# N:M weight masks (transposable, AdaPrune, compressed storage): thrifty/sparse/weights.py, adaprune.py, storage.py
from thrifty.sparse.adaprune import adaprune, nm_for_density, plan_from_unstructured, reestimate_bn  # noqa: E402
from thrifty.sparse.storage import load_sparse, save_sparse  # noqa: E402
from thrifty.sparse.weights import NM, NMMask, density, nm_masks, refresh_masks, sparsify  # noqa: E402

__all__ += ["NM", "NMMask", "sparsify", "density", "nm_masks", "refresh_masks", "adaprune", "nm_for_density",
            "plan_from_unstructured", "reestimate_bn", "save_sparse", "load_sparse"]
