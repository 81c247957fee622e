"""Networks from outside the registry: ``module:callable`` builders and RobustBench's model zoo.

RobustBench models come through the library itself (``robustbench.utils.load_model`` and its
``model_zoo``), never through a copy of its architectures, and never from the network: a
checkpoint that is not on disk is an error naming the path the library expects. Install the
extra: ``pip install -e ".[robustbench]"``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from saliency_robustness.errors import ConfigError, DataError, one_line
from saliency_robustness.fingerprints import robustbench_files


def import_callable(reference: str) -> Callable[..., nn.Module]:
    """The object ``module:attribute`` (``attribute`` may be dotted) names, importable from the
    user's environment (the job's ``PYTHONPATH``)."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"architecture {reference!r} is neither a registered name nor module:callable")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or any error the module raises on import
        raise ConfigError(f"architecture {reference!r}: cannot import {module_name} ({one_line(exc)})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"architecture {reference!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"architecture {reference!r} is not callable")
    return target


def _import_robustbench() -> ModuleType:
    """``robustbench.utils``. RobustBench 1.1.1 from PyPI imports ``autoattack``, which PyPI
    ships as ``pyautoattack`` (the same code, fra31/auto-attack); the alias lets the package
    import where only the PyPI release is installed. Its loader also needs ``pkg_resources``
    (setuptools < 81, pinned by the extra)."""
    if "autoattack" not in sys.modules:
        try:
            importlib.import_module("autoattack")
        except ImportError:
            try:
                alias = importlib.import_module("pyautoattack")
                sys.modules["autoattack"] = alias
                sys.modules["autoattack.state"] = importlib.import_module("pyautoattack.state")
            except ImportError:
                pass  # robustbench's own error below names what is missing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its imports warn about deprecated torch APIs
            return importlib.import_module("robustbench.utils")
    except ImportError as exc:
        raise ConfigError(f"RobustBench models need the extra robustbench: pip install -e '.[robustbench]' ({one_line(exc)})") from None


def _zoo_entry(name: str, dataset: str, threat_model: str) -> Mapping[str, Any]:
    _import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    models = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    if name not in models:
        raise ConfigError(f"RobustBench has no model {name!r} for {dataset} {threat_model}")
    return models[name]


def robustbench_network(*, name: str, dataset: str, threat_model: str, **_: Any) -> nn.Module:
    """RobustBench's architecture of ``name`` (randomly initialised), built by its model zoo."""
    return _zoo_entry(name, dataset, threat_model)["model"]()


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside reads plain tensors only (``weights_only=True``), also where
    a library calls it without that argument."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def load_robustbench(entry: Mapping[str, Any], data_root: str | Path) -> nn.Module:
    """The RobustBench model of ``entry`` (``name``, ``dataset``, ``threat_model``, ``model_dir``)
    through ``robustbench.utils.load_model``, from the checkpoint already on disk. Its input is
    the [0, 1] image; any normalisation is inside the model."""
    utils = _import_robustbench()
    name, dataset, threat = entry["name"], entry["dataset"], entry["threat_model"]
    zoo = _zoo_entry(name, dataset, threat)
    import timm

    if timm.is_model(f"{name.lower().replace('-', '_')}_{dataset}_{threat.lower()}"):
        raise ConfigError(
            f"RobustBench model {name} is served from the Hugging Face hub through timm, which this "
            "pipeline never downloads from; save its state_dict and give it as weights with its architecture"
        )
    if zoo["gdrive_id"] is None or (dataset == "imagenet" and "Standard" in name):
        raise ConfigError(f"RobustBench model {name} has no checkpoint file of its own (its builder downloads weights)")
    missing = [str(path) for path in robustbench_files(entry, data_root) if not path.is_file()]
    if missing:
        raise DataError(f"RobustBench checkpoint {missing[0]} not found (robustbench.utils.load_model expects it there; never downloaded)")
    try:
        with _weights_only_loads(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return utils.load_model(name, model_dir=str(robustbench_files(entry, data_root)[0].parents[2]), dataset=dataset, threat_model=threat)
    except Exception as exc:  # unpickling, key and shape errors of many types
        raise DataError(f"RobustBench model {name}: cannot load {robustbench_files(entry, data_root)[0]} ({one_line(exc)})") from None
