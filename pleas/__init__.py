"""pleas: merge trained image classifiers with PLeaS (Permutations and Least Squares).

High level::

    import pleas
    result = pleas.run(models=["resnet_a", "resnet_b"], width=1.5)   # what the CLI does
    result = pleas.merge(model_a, model_b, data, width=1.5)   # MergeResult(model, report, ...)
    result = pleas.merge_models([m1, m2, m3], data, width=2)   # K models, width in [1, K]
    pleas.save_merged(result.model, "out/")
    model = pleas.load_merged("out/")

Lower-level steps (the importable alignment API): :func:`derive_spec`, :func:`self_test`,
:func:`prepare` / :func:`build`, :func:`match_activations`, :func:`match_weights`,
:func:`permute_model`, :func:`allocate`, :func:`build_plan`, :func:`widen_state_dict`,
:func:`fit_all`, :func:`recalibrate_batchnorm`, :func:`executed_macs`; :func:`export_model`
(ONNX, TorchScript, torch.export).  Extension points: :func:`register_method`
(a merge method, :mod:`pleas.methods`) and :func:`register_module` (a module type's spec rule
and resizer, :mod:`pleas.registry`).
"""
from . import vit as _vit  # noqa: F401  (registers the attention rule)
from .config import MergeConfig
from .errors import MergeError
from .export import export_model
from .heads import ModelSide
from .lstsq import GramStats, fit_all
from .matching import GroupMatch, match_activations, match_many, match_weights
from .measure import executed_macs
from .merged import MergedFileError, MergedModel, load_merged, save_merged
from .methods import MergeMethod, Param
from .methods import get as get_method
from .methods import names as method_names
from .methods import register as register_method
from .normalization import MergedLayerNorm, recalibrate_batchnorm
from .output import OutputError
from .permute import permute_model, permute_state_dict, random_permutations, self_test
from .pipeline import METHODS, MergeResult, Prepared, build, merge_models, prepare, prepare_models
from .pipeline import merge  # `import pleas.merge` swaps in a callable module: same call
from .plan import allocate, build_plan, plan_cost
from .preprocess import Preprocess
from .registry import ModuleRule, ModuleRules, register_module
from .runner import RunResult, run
from .spec import (PermSpec, SpecError, UnsupportedOpError, derive_spec, register_function_rule,
                   register_method_rule, register_module_rule)
from .widen import build_module, widen_state_dict, widen_states

__version__ = "0.1.0"

__all__ = [
    "run", "RunResult", "MergeConfig", "merge", "merge_models", "prepare", "prepare_models",
    "build", "match_many", "widen_states", "MergeResult", "MergeError",
    "ModelSide", "Prepared", "METHODS", "MergeMethod", "Param", "register_method", "get_method",
    "method_names", "derive_spec", "PermSpec", "SpecError", "UnsupportedOpError",
    "register_module", "ModuleRule", "ModuleRules", "register_module_rule",
    "register_function_rule", "register_method_rule", "self_test", "random_permutations",
    "permute_model", "permute_state_dict", "match_activations", "match_weights", "GroupMatch",
    "allocate", "build_plan", "plan_cost", "widen_state_dict", "build_module", "GramStats",
    "fit_all", "recalibrate_batchnorm", "MergedLayerNorm", "MergedModel", "save_merged",
    "load_merged", "MergedFileError", "OutputError", "export_model", "executed_macs",
    "Preprocess", "__version__",
]
