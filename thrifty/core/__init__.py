"""Config base and YAML, the handler registry, the module walker and filters."""
from thrifty.core.apply import (
    HANDLERS,
    PIPELINES,
    Filter,
    apply,
    check_layers_run,
    explicit_names,
    handler_for,
    iter_selected,
    make_filter,
    register_handler,
    register_pipeline,
    register_prepare,
    strip,
    untied_views,
    wrap_layers,
)
from thrifty.core.revert import Outcome, keep_if_better
from thrifty.core.select import keep_module_path, layer_status, outermost, uncalled_layers
from thrifty.core.config import (
    CONFIG_ALIASES, CONFIGS, Config, config_class, from_dict, from_yaml, import_config_modules, register_config,
    flat_fields, nest_moved, to_dict, to_yaml, with_overrides,
)
from thrifty.core.optim import OptimConfig
from thrifty.core.compat import config_first, deprecated_alias, old_order_warning

__all__ = [
    "HANDLERS", "Filter", "apply", "check_layers_run", "explicit_names", "handler_for", "keep_module_path", "layer_status",
    "outermost", "uncalled_layers", "iter_selected", "make_filter", "register_handler", "strip", "untied_views",
    "wrap_layers", "CONFIGS", "Config", "config_class", "from_dict", "from_yaml", "register_config", "to_dict",
    "to_yaml", "PIPELINES", "register_pipeline", "register_prepare", "import_config_modules",
    "config_first", "old_order_warning", "CONFIG_ALIASES", "deprecated_alias", "Outcome", "keep_if_better",
    "OptimConfig", "nest_moved", "with_overrides", "flat_fields",
]
