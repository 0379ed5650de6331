"""pleas: merge two trained image classifiers with PLeaS (Permutations and Least Squares).

High level::

    import pleas
    result = pleas.merge(model_a, model_b, data, width=1.5)   # MergeResult(model, report, ...)
    pleas.save_merged(result.model, "out/")
    model = pleas.load_merged("out/")

Lower-level steps (the importable alignment API): :func:`derive_spec`, :func:`self_test`,
:func:`prepare` / :func:`build`, :func:`match_activations`, :func:`match_weights`,
:func:`permute_model`, :func:`allocate`, :func:`build_plan`, :func:`widen_state_dict`,
:func:`fit_all`, :func:`recalibrate_batchnorm`.
"""
from . import vit as _vit  # noqa: F401  (registers the attention rule)
from .matching import GroupMatch, match_activations, match_weights
from .merged import MergedModel, load_merged, save_merged
from .normalization import recalibrate_batchnorm
from .permute import permute_model, permute_state_dict, random_permutations, self_test
from .pipeline import METHODS, MergeError, MergeResult, ModelSide, Prepared, build, prepare
from .pipeline import merge  # `import pleas.merge` swaps in a callable module: same call
from .plan import allocate, build_plan, plan_cost
from .spec import PermSpec, SpecError, UnsupportedOpError, derive_spec, register_module_rule
from .lstsq import GramStats, fit_all
from .widen import build_module, widen_state_dict

__version__ = "0.1.0"

__all__ = [
    "merge", "prepare", "build", "MergeResult", "MergeError", "ModelSide", "Prepared", "METHODS",
    "derive_spec", "PermSpec", "SpecError", "UnsupportedOpError", "register_module_rule",
    "self_test", "random_permutations", "permute_model", "permute_state_dict",
    "match_activations", "match_weights", "GroupMatch", "allocate", "build_plan", "plan_cost",
    "widen_state_dict", "build_module", "GramStats", "fit_all", "recalibrate_batchnorm",
    "MergedModel", "save_merged", "load_merged", "__version__",
]
