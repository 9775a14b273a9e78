"""OmegaConf configs: loading and merging with provenance, and `target:`/`params:` instantiation.

Configs follow the CompVis reference: every buildable node is ``{target: dotted.path, params: {...}}``.
Errors name the config key path (``model.params.lossconfig.params.disc_start``) and, when the config was
loaded from files, the file that set that key, so a typo in a merged stack of YAMLs is found at once.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import inspect
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm import assets

# Root config id -> {dotted key path -> file that set it last}. Filled by `load_configs`; nested nodes
# find their root through OmegaConf's parent links, so a sub-config handed to a model constructor still
# knows where it came from.
_SOURCES: dict[int, dict[str, str]] = {}


class ConfigError(ValueError):
    """A config that cannot be built; the message names the key path and the file that set it."""


# What a config read to load a model (a model directory someone shared) may build: classes of these packages.
# `target: os.system` in such a config would otherwise run a command when the model loads. The programs
# (`ldm.cli`, whose `main` reads and runs further configs) are not classes and are refused with everything else.
# A training config is the user's own program and may name anything, as in the reference; a run being resumed
# (`main.py -r`, its saved configs possibly someone else's) may also build Lightning's callbacks and loggers.
SAFE_TARGET_PACKAGES = ("ldm", "torch.nn")
RESUME_TARGET_PACKAGES = SAFE_TARGET_PACKAGES + ("torch.optim", "pytorch_lightning.callbacks",
                                                 "pytorch_lightning.loggers", "lightning.pytorch.callbacks",
                                                 "lightning.pytorch.loggers")
TRUST_HINT = ("if you trust this config (it is your own, or from someone you trust), load it with --trust_config "
              "(load_model(..., trust_config=True))")


@dataclasses.dataclass(frozen=True)
class TargetPolicy:
    """What `instantiate_from_config` may build within `safe_targets_only`, and what its refusal says."""
    packages: tuple[str, ...] = SAFE_TARGET_PACKAGES
    doing: str = "loading a model"
    hint: str = TRUST_HINT

    def allows(self, module_name: str) -> bool:
        return any(module_name == p or module_name.startswith(p + ".") for p in self.packages)


RESUMING_A_RUN = TargetPolicy(RESUME_TARGET_PACKAGES, "resuming a run from its saved configs",
                              "if you trust this run's configs (your own run, or from someone you trust), resume it "
                              "with --trust_config")
_SAFE_TARGETS_ONLY: contextvars.ContextVar[Optional[TargetPolicy]] = contextvars.ContextVar("safe_targets_only",
                                                                                           default=None)


@contextlib.contextmanager
def safe_targets_only(enabled: bool = True, policy: TargetPolicy = TargetPolicy()) -> Iterator[None]:
    """Within this block `instantiate_from_config` builds only classes of the `policy`'s packages (the module
    is checked before it is imported) and refuses anything else with a `ConfigError` naming the target, also
    for the configs a constructor instantiates in turn. `enabled=False` (a trusted config) lifts nothing that
    an outer block set."""
    token = _SAFE_TARGETS_ONLY.set(_SAFE_TARGETS_ONLY.get() or (policy if enabled else None))
    try:
        yield
    finally:
        _SAFE_TARGETS_ONLY.reset(token)


def _flatten_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, Mapping):
        keys = []
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            keys.append(path)
            keys.extend(_flatten_keys(v, path))
        return keys
    return []


# Parameters that name files. A relative one means, in order: the file beside its config file (a model directory's
# `tokenizer_path: vocab.txt`), the file relative to the working directory (a user's own file always wins), or the
# toolkit's own file of that name (configs/ name the built-in weights relative to the repository root, found by
# `ldm.assets.resolve` from any directory and inside a wheel). A name found nowhere is left as written, so that the
# error names what the user wrote.
FILE_PARAMS = ("ckpt_path", "tokenizer_path")


def _anchor_file_references(node: Any, directory: Optional[Path]) -> None:
    """`FILE_PARAMS` in a plain (unresolved) container made absolute where they name an existing file (`directory`:
    the config file's; None for the command line, whose paths are the working directory's and stay as written)."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in children:
        if key in FILE_PARAMS and isinstance(value, str) and value and "${" not in value \
                and not Path(value).is_absolute():
            beside = directory / value if directory is not None else None
            found = beside if beside is not None and beside.exists() else assets.resolve(value)
            if found.exists() and found != Path(value):
                node[key] = str(found.resolve())
        else:
            _anchor_file_references(value, directory)


def load_configs(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> DictConfig:
    """Load YAML files, merge them left to right, then apply dotlist overrides (``a.b.c=1``). A node whose
    `target:` a later file (or override) changes is replaced whole, params included (`_drop_retargeted`).

    Remembers which file (or ``command line``) set each key, for error messages.
    """
    sources: dict[str, str] = {}
    configs = []
    for path in paths:
        path = assets.resolve(path)  # `--base configs/...` works from any directory, and from a wheel
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg = OmegaConf.load(path)
        except Exception as e:  # yaml.ScannerError and friends: keep the parser's line/column
            raise ConfigError(f"cannot parse config file {path}: {e}") from e
        raw = OmegaConf.to_container(cfg, resolve=False)
        _anchor_file_references(raw, path.parent)
        cfg = OmegaConf.create(raw)
        for key in _flatten_keys(OmegaConf.to_container(cfg)):
            sources[key] = str(path)
        configs.append(cfg)
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
    except Exception as e:
        raise ConfigError(f"cannot parse command-line override(s) {list(overrides)}: {e}") from e
    raw = OmegaConf.to_container(cli, resolve=False)
    _anchor_file_references(raw, None)  # a file named on the command line: from here, else the toolkit's own
    cli = OmegaConf.create(raw)
    for key in _flatten_keys(OmegaConf.to_container(cli)):
        sources[key] = "command line"
    merged = OmegaConf.create({})
    for cfg in (*configs, cli):
        merged = merge_onto(merged, cfg)
    _SOURCES[id(merged)] = sources
    return merged


def merge_onto(base: Any, overlay: Any) -> DictConfig:
    """`overlay` merged onto `base` as `load_configs` merges files: a node whose `target:` the overlay changes is
    replaced whole (`_drop_retargeted`), anything else merges key by key."""
    plain = OmegaConf.to_container(OmegaConf.create(base), resolve=False)
    _drop_retargeted(plain, OmegaConf.to_container(OmegaConf.create(overlay), resolve=False))
    return OmegaConf.merge(OmegaConf.create(plain), overlay)


def _drop_retargeted(base: Any, overlay: Any) -> None:
    """Where `overlay` gives a node another `target:` than `base` has, remove `base`'s node, so that the overlay
    replaces it whole instead of merging its params into the old target's (a user's data block over a shipped
    config: `ImageFolderDataset` must not inherit `ShapesTrain`'s `num_samples`)."""
    if not (isinstance(base, dict) and isinstance(overlay, dict)):
        return
    for key, node in overlay.items():
        old = base.get(key)
        if isinstance(node, dict) and isinstance(old, dict):
            if "target" in node and "target" in old and node["target"] != old["target"]:
                del base[key]
            else:
                _drop_retargeted(old, node)


def _key_path(node: Any) -> str:
    if isinstance(node, (DictConfig, ListConfig)):
        return node._get_full_key(None) or "<root>"
    return "<config>"


def describe_key(node: Any, key: str | None = None) -> str:
    """``'model.params.x' (set in configs/a.yaml)`` for a node of a loaded config, or just the path."""
    path = _key_path(node)
    if key is not None:
        path = key if path == "<root>" else f"{path}.{key}"
    where = None
    if isinstance(node, (DictConfig, ListConfig)):
        sources = _SOURCES.get(id(node._get_root()), {})
        # The key itself, or the nearest parent that a file set (a missing key was not set anywhere).
        probe = path
        while probe and where is None:
            where = sources.get(probe)
            probe = probe.rpartition(".")[0]
    return f"'{path}'" + (f" (set in {where})" if where else "")


def named_option(spec: Any, option: str) -> tuple[Any, dict[str, Any]]:
    """(name, parameters) of an option given as a name or as ``{type: name, ...parameters}`` (e.g.
    `noise_level_density`, `noise_process`); anything else is a ValueError naming `option`."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        params = dict(spec)
        return params.pop("type", None), params
    raise ValueError(f"{option} must be a name or {{type: name, ...}}, got {spec!r}")


# The reference's module names that live elsewhere here: its `main.py` is `ldm.cli.train` (a checkout's main.py
# only calls it), so `main.DataModuleFromConfig` resolves in an installed wheel, from any directory.
REFERENCE_MODULES = {"main": "ldm.cli.train"}


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import ``package.module.Name`` and return ``Name``."""
    module_name, _, cls = string.rpartition(".")
    if not module_name:
        raise ImportError(f"'{string}' is not a dotted path like 'package.module.ClassName'")
    module_name = REFERENCE_MODULES.get(module_name, module_name)
    module = importlib.import_module(module_name)
    if reload:
        module = importlib.reload(module)
    if cls.startswith("__") or not hasattr(module, cls):  # `ldm.util.__class__` is the type of modules, not a target
        raise ImportError(f"module '{module_name}' has no attribute '{cls}'")
    return getattr(module, cls)


def _accepts(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a type hint. Unknown or complex hints accept anything."""
    if hint is inspect.Parameter.empty or hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_accepts(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is bool:
        return isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (list, tuple, Sequence, typing.Sequence):
        return isinstance(value, (list, tuple, ListConfig))
    if container in (dict, Mapping, typing.Mapping):
        return isinstance(value, (dict, DictConfig))
    return True


def _constructor_fields(cls: Any) -> tuple[dict[str, inspect.Parameter], set[str], dict[str, Any], bool]:
    """Accepted parameters, the required ones, type hints and open-endedness of a constructor.

    A subclass whose ``__init__`` passes ``**kwargs`` up (``LatentDiffusion(DDPM)``, as the reference)
    also accepts its bases' parameters, so those are followed along the MRO until a constructor that
    takes no ``**kwargs``; only then is an unknown name known to be wrong. Only the class's own
    required parameters are required: a subclass may supply its bases' itself.
    """
    functions = [c.__init__ for c in cls.__mro__ if "__init__" in vars(c)] if inspect.isclass(cls) else [cls]
    fields: dict[str, inspect.Parameter] = {}
    required: set[str] = set()
    hints: dict[str, Any] = {}
    for depth, function in enumerate(functions):
        parameters = inspect.signature(function).parameters
        try:
            hints = {**typing.get_type_hints(function), **hints}
        except Exception:  # unresolvable forward references: skip type checks, keep the other checks
            pass
        for name, field in parameters.items():
            if name == "self" or field.kind in (field.VAR_POSITIONAL, field.VAR_KEYWORD):
                continue
            fields.setdefault(name, field)
            if depth == 0 and field.default is field.empty:
                required.add(name)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return fields, required, hints, False
    return fields, required, hints, True


def _check_params(cls: Any, params: Mapping, node: Any) -> None:
    """Missing required params, unknown params and wrong types, each named by key path and file."""
    try:
        fields, required, hints, takes_kwargs = _constructor_fields(cls)
    except (TypeError, ValueError):  # builtins without a signature: let the call itself decide
        return
    params_node = node.get("params") if isinstance(node, DictConfig) else None
    where = params_node if isinstance(params_node, DictConfig) else node
    sub = None if where is params_node else "params"
    for name in fields:
        if name in required and name not in params:
            raise ConfigError(
                f"{describe_key(where, f'{sub}.{name}' if sub else name)}: missing required parameter "
                f"'{name}' of {cls.__module__}.{cls.__qualname__}; add it under 'params:'"
            )
    for name, value in params.items():
        if name not in fields:
            if takes_kwargs:
                continue
            allowed = ", ".join(fields)
            raise ConfigError(
                f"{describe_key(where, f'{sub}.{name}' if sub else name)}: unknown parameter '{name}' for "
                f"{cls.__module__}.{cls.__qualname__}; it accepts: {allowed}"
            )
        hint = hints.get(name, fields[name].annotation)
        if isinstance(hint, str):  # unresolved string annotation
            continue
        if not _accepts(value, hint):
            raise ConfigError(
                f"{describe_key(where, f'{sub}.{name}' if sub else name)}: expected {_hint_name(hint)} for "
                f"'{name}' of {cls.__module__}.{cls.__qualname__}, got {type(value).__name__} {value!r}"
            )


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def instantiate_from_config(config: Any, /, **extra: Any) -> Any:
    """Build ``config.target(**config.params, **extra)``, as the reference's helper does.

    The reference's sentinels keep working: ``__is_first_stage__`` and ``__is_unconditional__`` return
    None. Errors are `ConfigError` naming the key path and file.
    """
    if isinstance(config, str) and config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    cls = target_of(config)
    params = config.get("params", None) or {}
    if not isinstance(params, (Mapping, DictConfig)):
        raise ConfigError(f"{describe_key(config, 'params')}: 'params' must be a mapping, got {params!r}")
    _check_params(cls, {**params, **extra}, config)
    try:
        return cls(**params, **extra)
    except ConfigError:
        raise
    except ValueError as e:  # a constructor refusing a value it was given: name where the config set it
        raise ConfigError(f"{describe_key(config)}: {e}") from e


def refuse_unsafe_targets(paths: Sequence[str | Path], policy: TargetPolicy = RESUMING_A_RUN) -> None:
    """A `ConfigError` naming the first `target:` in the config files at `paths` that `policy` refuses (checked
    before anything is built: `main.py -r` of a run someone else saved)."""
    def targets(node: Any) -> Iterator[Any]:
        if isinstance(node, DictConfig):
            if isinstance(node.get("target", None), str):
                yield node
            for key in node:
                yield from targets(node._get_node(key))
        elif isinstance(node, ListConfig):
            for item in node:
                yield from targets(item)

    with safe_targets_only(True, policy):
        for path in paths:
            for node in targets(load_configs([path])):
                target_of(node)


def target_of(config: Any) -> Any:
    """What ``config.target`` names, imported, within the `safe_targets_only` policy in force."""
    if not isinstance(config, (Mapping, DictConfig)):
        raise ConfigError(f"expected a mapping with a 'target:' key, got {config!r}")
    if "target" not in config:
        raise ConfigError(f"{describe_key(config)}: expected key 'target' to instantiate (with optional 'params:')")
    target = config["target"]
    policy = _SAFE_TARGETS_ONLY.get()
    safe_only = policy is not None
    refused = ConfigError(f"{describe_key(config, 'target')}: refusing to build '{target}' while {policy.doing}: "
                          f"only classes of {', '.join(policy.packages)} are built from such a config "
                          f"(anything else could run code); {policy.hint}") if safe_only else None
    module_name = str(target).rpartition(".")[0]
    if safe_only and not policy.allows(REFERENCE_MODULES.get(module_name, module_name)):
        raise refused  # before the import: importing a module can run code too
    try:
        cls = get_obj_from_str(target)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{describe_key(config, 'target')}: unknown target '{target}': {e}") from e
    if safe_only and not (inspect.isclass(cls) and policy.allows(cls.__module__)):  # also no re-exported classes
        raise refused
    return cls
