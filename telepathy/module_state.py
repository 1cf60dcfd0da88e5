"""The live state dicts a per-step snapshot copies: a module's ``state_dict(keep_vars=True)`` built in one loop
instead of one ``state_dict`` call per submodule (each call checks its hooks and builds its metadata: on the
default LatentWire workload those 36 calls were a fifth of a step's snapshot), and :class:`LiveStateDicts` and
:class:`LiveOptimizerState`, which give the same dict again while dict version tags say nothing it was made from
changed. The loop is used only where it gives the same dict, keys, order and ``_metadata``: no module in the tree
overrides ``state_dict``, ``_save_to_state_dict`` or ``get_extra_state`` (on its class or on the instance), or
has a state-dict hook, nobody patched those on ``nn.Module`` itself, and the tree has no cycle; otherwise the
module's own ``state_dict`` is called. Checked at every call: a class patched during the run is seen at the next
step."""

from __future__ import annotations

import operator
import sys
import types
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.optim import optimizer as _optimizer_module

from telepathy.tree import KeptVersions
from telepathy.unchanged import dict_version


def _torch_own(f: object) -> bool:
    """torch's own function (not a patch, wrapper or partialmethod put on nn.Module)."""
    return isinstance(f, types.FunctionType) and f.__code__.co_filename == _torch_module.__file__


def _plain_class(cls: type) -> bool:
    return (
        cls.state_dict is nn.Module.state_dict
        and cls._save_to_state_dict is nn.Module._save_to_state_dict
        and getattr(cls, "get_extra_state", nn.Module.get_extra_state) is nn.Module.get_extra_state
    )


def _plain(m: nn.Module) -> bool:
    """Module's own state dict: not overridden by the class or on the instance, no state-dict hook."""
    d = m.__dict__
    return (
        _plain_class(type(m))
        and not (m._state_dict_pre_hooks or m._state_dict_hooks)
        and "state_dict" not in d
        and "_save_to_state_dict" not in d
        and "get_extra_state" not in d
    )


def live_state_dict(module: Any) -> dict[str, Any]:
    """``module.state_dict(keep_vars=True)``: the parameters and persistent buffers themselves (not detached),
    under the same keys, in the same order, with the same ``_metadata`` (each module's version). A part whose
    ``state_dict`` is its own (not a module, or overridden by its class or on the instance: it may not take
    ``keep_vars``) gives ``state_dict()`` as it is."""
    if _own_state_dict(module):
        return module.state_dict()
    walked = _walk(module)
    return module.state_dict(keep_vars=True) if walked is None else walked[0]


def _own_state_dict(part: Any) -> bool:
    return (
        not isinstance(part, nn.Module)
        or type(part).state_dict is not nn.Module.state_dict
        or ("state_dict" in part.__dict__)
    )


def _walk(module: nn.Module) -> tuple[OrderedDict[str, Any], list[nn.Module]] | None:
    """The state dict and the modules it came from, in walking order; None where the loop would not give what
    ``state_dict`` gives (see the module's docstring)."""
    if not (_torch_own(nn.Module.state_dict) and _torch_own(nn.Module._save_to_state_dict)):
        return None  # patched on nn.Module itself
    depth_limit = sys.getrecursionlimit()  # a cycle: state_dict's RecursionError, not an endless loop
    destination: Any = OrderedDict()
    metadata = destination._metadata = KeptVersions()
    modules: list[nn.Module] = []
    pending = [("", module, 0)]  # depth first, a module's own entries before its children's, as state_dict does
    while pending:
        prefix, m, depth = pending.pop()
        if depth > depth_limit or not _plain(m):
            return None
        modules.append(m)
        metadata[prefix[:-1]] = {"version": m._version}
        for name, param in m._parameters.items():
            if param is not None:
                destination[prefix + name] = param
        if m._buffers:
            skip = m._non_persistent_buffers_set
            for name, buf in m._buffers.items():
                if buf is not None and name not in skip:
                    destination[prefix + name] = buf
        if m._modules:
            children = reversed(m._modules.items())
            pending.extend((prefix + name + ".", child, depth + 1) for name, child in children if child is not None)
    return destination, modules


class LiveStateDicts:
    """:func:`live_state_dict` of each part (by name), given again (the same dict) while nothing it was made from
    changed: no dict of any module in the tree (its attributes, parameters, buffers, children, state-dict hooks)
    changed its version tag (:func:`telepathy.unchanged.dict_version`) or was replaced, no module changed its
    class, no class or ``nn.Module`` itself was patched, no non-persistent buffer set changed. That check costs a
    fifth of the walk. Where version tags are missing, where a change could escape them (a module's dicts of
    another kind than ``dict``, whose order can change without a new tag; a ``_version`` that is not a plain int
    class attribute), or where a part changes at every step (a module that sets an attribute in ``forward``), the
    walk is made at every step."""

    GIVE_UP_AFTER = 3  # rebuilds in a row: the part changes at every step, checking first only costs more

    def __init__(self) -> None:
        self._made: dict[str, _Made] = {}  # part name -> what was made for the part under that name

    def retain(self, names: Any) -> None:
        """Let go of what was made for parts no longer among ``names`` (a part removed from the Checkpointer)."""
        if self._made.keys() - names:
            self._made = {name: made for name, made in self._made.items() if name in names}

    def __call__(self, name: str, part: Any) -> dict[str, Any]:
        made = self._made.get(name)
        if made is not None and made.part is not part:  # another part under this name: the old one is let go
            made = None
        if made is not None and made.state is not None and made.holds():
            return made.state
        misses = 0 if made is None else made.misses + 1
        version = dict_version()
        if version is None or _own_state_dict(part):
            self._made.pop(name, None)
            return live_state_dict(part)
        if made is not None and made.gave_up:
            return live_state_dict(part)
        walked = _walk(part)
        if walked is None:
            self._made.pop(name, None)
            return part.state_dict(keep_vars=True)
        self._made[name] = _Made(part, *walked, version, misses, gave_up=misses >= self.GIVE_UP_AFTER)
        return walked[0]


class _Made:
    """A part's live state dict and what it was made from (``state`` None: not kept, the walk is made again)."""

    def __init__(self, part: nn.Module, state: OrderedDict[str, Any], modules: list[nn.Module],
                 version: Callable[[dict[Any, Any]], int], misses: int, gave_up: bool) -> None:  # fmt: skip
        self.part, self.version, self.misses, self.gave_up = part, version, misses, gave_up
        kept = not gave_up and all(_keepable(m) for m in modules)
        self.state: OrderedDict[str, Any] | None = state if kept else None
        if not kept:
            return
        self.functions = (nn.Module.state_dict, nn.Module._save_to_state_dict)
        self.modules, self.types = modules, list(map(type, modules))  # (``__class__`` can be swapped in place)
        self.own_dicts = list(map(_OWN_DICT, modules))  # (and ``__dict__`` replaced)
        self.classes = {type(m): type(m)._version for m in modules}
        self.dicts = [d for m in modules for d in _dicts(m)]
        self.versions = list(map(version, self.dicts))
        self.sets = [(m._non_persistent_buffers_set, frozenset(m._non_persistent_buffers_set))
                     for m in modules if m._buffers]  # fmt: skip

    def holds(self) -> bool:
        if self.functions != (nn.Module.state_dict, nn.Module._save_to_state_dict):
            return False
        if list(map(type, self.modules)) != self.types:
            return False
        if not all(map(operator.is_, map(_OWN_DICT, self.modules), self.own_dicts)):
            return False
        if not all(_plain_class(c) and type(c._version) is int and c._version == v for c, v in self.classes.items()):
            return False
        if list(map(self.version, self.dicts)) != self.versions:
            return False
        if not all(s == frozen for s, frozen in self.sets):
            return False
        self.misses = 0
        return True


_OWN_DICT = operator.attrgetter("__dict__")


def _keepable(m: nn.Module) -> bool:
    """Every change to what ``m`` puts in a state dict shows in a dict version tag: its parameters, buffers and
    children are plain dicts (an OrderedDict can be reordered without a new tag), and its class's ``_version``
    is a plain int (not a slot or property that could change unseen)."""
    return (
        type(m._parameters) is dict
        and type(m._buffers) is dict
        and type(m._modules) is dict
        and type(type(m)._version) is int
        and type(m.__dict__.get("_version", 0)) is int
    )


def _dicts(m: nn.Module) -> tuple[dict[Any, Any], ...]:
    """The dicts whose contents make a module's entries in a state dict (its ``__dict__`` holds the others, the
    instance's overrides and its ``_version``)."""
    return (m.__dict__, m._parameters, m._buffers, m._modules, m._state_dict_pre_hooks, m._state_dict_hooks)


class LiveOptimizerState:
    """An optimizer's ``state_dict()``, made from what it was at an earlier step while its ``state`` mapping keeps
    its version tag and each param group its parameters: the packed ``state`` (a parameter's state dict is the
    optimizer's own, read again by whoever uses the result) and each group whose dict kept its tag are the same
    objects as before; a group whose hyper-parameters changed (a scheduler's new ``lr`` at every step) is packed
    again the way ``Optimizer.state_dict`` packs it. Only torch's own ``state_dict`` without hooks is kept this way;
    otherwise, and without version tags, it is called at every step."""

    def __init__(self) -> None:
        self._made: _MadeOptimizer | None = None

    def forget(self) -> None:
        """Let go of the optimizer (the Checkpointer has none any more)."""
        self._made = None

    def __call__(self, optimizer: Any) -> dict[str, Any]:
        version = dict_version()
        if version is None or not _plain_optimizer(optimizer):
            self._made = None
            return optimizer.state_dict()
        made, groups = self._made, optimizer.param_groups
        if made is not None and made.optimizer is optimizer and made.holds(groups):
            return made.result(groups)
        result = optimizer.state_dict()
        self._made = _MadeOptimizer(optimizer, version, result)
        return result


class _MadeOptimizer:
    def __init__(self, optimizer: Any, version: Callable[[dict[Any, Any]], int], result: dict[str, Any]) -> None:
        self.optimizer, self.version, self.last = optimizer, version, result
        self.state_version = version(optimizer.state)
        self.groups = [(group, list(group["params"])) for group in optimizer.param_groups]
        packed_groups = zip(optimizer.param_groups, result["param_groups"], strict=True)
        self.packed = [(version(group), packed) for group, packed in packed_groups]

    def holds(self, groups: list[dict[str, Any]]) -> bool:
        """The same state mapping and the same parameters in the same groups (hyper-parameters may differ)."""
        return (
            self.version(self.optimizer.state) == self.state_version
            and len(groups) == len(self.groups)
            and all(
                group is was and len(group["params"]) == len(params) and all(map(operator.is_, group["params"], params))
                for group, (was, params) in zip(groups, self.groups)
            )
        )  # fmt: skip

    def result(self, groups: list[dict[str, Any]]) -> dict[str, Any]:
        changed = False
        for i, group in enumerate(groups):
            tag, packed = self.packed[i]
            if self.version(group) != tag:  # (as Optimizer.state_dict packs a group: "params" last, as indexes)
                repacked = {k: v for k, v in group.items() if k != "params"}
                repacked["params"] = packed["params"]
                self.packed[i] = (self.version(group), repacked)
                changed = True
        if changed:
            self.last = {"state": self.last["state"], "param_groups": [packed for _, packed in self.packed]}
        return self.last


_TORCH_WRAPPERS = {_optimizer_module.__file__, getattr(getattr(torch, "_compile", None), "__file__", None)}


def _torch_optimizer_state_dict() -> bool:
    """``Optimizer.state_dict`` is torch's own (maybe wrapped by its ``_disable_dynamo``), not a patch."""
    f = torch.optim.Optimizer.state_dict
    inner = getattr(f, "__wrapped__", f)
    return (
        isinstance(f, types.FunctionType)
        and f.__code__.co_filename in _TORCH_WRAPPERS
        and isinstance(inner, types.FunctionType)
        and inner.__code__.co_filename == _optimizer_module.__file__
    )


def _plain_optimizer(optimizer: Any) -> bool:
    return (
        isinstance(optimizer, torch.optim.Optimizer)
        and type(optimizer).state_dict is torch.optim.Optimizer.state_dict
        and _torch_optimizer_state_dict()
        and "state_dict" not in optimizer.__dict__
        and not optimizer._optimizer_state_dict_pre_hooks
        and not optimizer._optimizer_state_dict_post_hooks
        and type(optimizer.state) in (dict, defaultdict)
        and all(type(group) is dict for group in optimizer.param_groups)
    )
