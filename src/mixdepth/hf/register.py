"""After `import mixdepth`, transformers' Auto classes know the model type "mixdepth".

Registering needs the classes, and the classes need transformers (about 1 s for its config module,
4-5 s more for `PreTrainedModel` on 2 CPU cores), which most `mixdepth` commands never use. So
`install()` (run by `import mixdepth`) registers at once only what transformers has already
loaded, and otherwise puts a small finder on `sys.meta_path` that registers each Auto class
right after transformers loads its module: `AutoConfig` with `configuration_auto`,
`AutoModelForCausalLM` with `modeling_auto`. Importing mixdepth costs nothing more, and a
program that imports transformers (before or after mixdepth) finds "mixdepth" registered.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

log = logging.getLogger("mixdepth")

_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_MODEL_MODULE = "transformers.models.auto.modeling_auto"


def register_config() -> None:
    from .configuration import MODEL_TYPE, MixdepthConfig

    auto = sys.modules[_CONFIG_MODULE]
    if MODEL_TYPE not in auto.CONFIG_MAPPING:
        auto.AutoConfig.register(MODEL_TYPE, MixdepthConfig, exist_ok=True)


def register_model() -> None:
    from .modeling import MixdepthConfig, MixdepthForCausalLM

    auto = sys.modules[_MODEL_MODULE]
    auto.AutoModelForCausalLM.register(MixdepthConfig, MixdepthForCausalLM, exist_ok=True)


_AFTER = {_CONFIG_MODULE: register_config, _MODEL_MODULE: register_model}


def _run(callback) -> None:
    try:
        callback()
    except Exception as e:  # registering must never break importing transformers
        log.debug("could not register mixdepth with transformers: %s", e)


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the registration."""

    def __init__(self, loader, callback) -> None:
        self.loader, self.callback = loader, callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _run(self.callback)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        callback = _AFTER.get(name)
        if callback is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, callback)
        return spec


def install() -> None:
    """Register now what transformers has loaded; register the rest when it loads it."""
    for name, callback in _AFTER.items():
        if name in sys.modules:
            _run(callback)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
