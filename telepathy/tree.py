"""One walker over nested state (dicts, lists, tuples of tensors and plain values): snapshots, blob references,
size estimates and the conversion to plain types all go through :func:`transform`, so "what counts as a
container" is decided once. No torch import: callers decide what a leaf is."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from telepathy.errors import UsageError

KEEP = object()  # returned by a leaf function: "not a leaf for me, walk into it or keep it as it is"


class Fixed:
    """A value that stays the same from step to step (a run's signature and metadata), handed to a per-step
    snapshot, which describes it once and afterwards only sees that it is the same object. Whoever makes one
    makes a new one rather than change its value. Never in a saved file."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def transform(obj: Any, leaf: Callable[[Any, str], Any], *, key: Callable[[Any], Any] | None = None,
              path: str = "", strict: bool = False) -> Any:  # fmt: skip
    """A copy of ``obj`` with every value for which ``leaf(value, path)`` returns something other than
    :data:`KEEP` replaced by that. Mappings become dicts (their keys passed through ``key`` when given) except
    the kinds a checkpoint loads as they are (OrderedDict, Counter); lists, tuples, sets and torch.Size keep
    their kind (frozensets and other tuples become lists and tuples). ``path`` names a value's position
    (``/a/b[2]``), stable across calls on same-shaped state: reusable buffers are keyed by it. A module's state
    dict keeps its ``_metadata`` (see :func:`module_versions`). ``strict`` (a copy that is saved): a container of
    another kind (a defaultdict, a namedtuple, a frozenset) raises UsageError rather than being converted, as a
    full save refuses it (a resume could not load it back)."""
    replacement = leaf(obj, path)
    if replacement is not KEEP:
        return replacement
    if strict and isinstance(obj, (Mapping, list, tuple, set, frozenset)) and not is_kept_kind(type(obj)):
        raise UsageError(f"{path or 'the state'}: a {type(obj).__module__}.{type(obj).__qualname__}, which a "
                         "checkpoint cannot load back (it loads with weights_only=True); use a dict, list, tuple, "
                         "set, Counter or OrderedDict")  # fmt: skip
    if isinstance(obj, Mapping):
        copy = {(key(k) if key else k): transform(v, leaf, key=key, path=f"{path}/{k}", strict=strict)
                for k, v in obj.items()}  # fmt: skip
        versions = module_versions(obj)
        if versions is not None:
            return with_module_versions(copy, versions)
        return type(obj)(copy) if type(obj) in KEPT_MAPPINGS else copy
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [transform(v, leaf, key=key, path=f"{path}[{i}]", strict=strict) for i, v in enumerate(obj)]
        kind = type(obj)
        if kind is set:
            try:
                return set(items)
            except TypeError:  # its tensors became blob references (dicts): a list would come back instead
                raise UsageError(f"{path or 'the state'}: a set holding tensors of 64 KiB or more cannot be kept by "
                                 "the differential and compressed formats (they store such tensors apart); hold "
                                 "them in a list, or use format 'full'") from None  # fmt: skip
        if is_size(kind):
            return kind(items)
        return tuple(items) if isinstance(obj, tuple) else items
    return obj


# Containers other than dict, list and tuple that ``torch.load(weights_only=True)`` reads back, and so a full save
# keeps: every copy keeps them too (a resumed MultiStepLR's milestones stay a Counter; set, torch.Size alike).
KEPT_MAPPINGS = frozenset({OrderedDict, Counter})


def is_kept_kind(kind: type) -> bool:
    """A container kind every copy keeps and ``torch.load(weights_only=True)`` reads back as it was."""
    return kind in (dict, list, tuple, set) or kind in KEPT_MAPPINGS or is_size(kind)


def is_size(kind: type) -> bool:
    """``torch.Size`` (named, not imported: this module stays torch-free)."""
    return kind.__name__ == "Size" and kind.__module__ == "torch"


def module_versions(obj: Any) -> Any:
    """The ``_metadata`` of a module's state dict (an OrderedDict attribute: each submodule's ``_version``), or
    None. ``load_state_dict`` hands it to every module's ``_load_from_state_dict``: without it a module believes
    its state comes from an old version and converts it (a quantization observer resets its ``eps``), so every
    copy of a state dict must keep it."""
    return getattr(obj, "_metadata", None) if isinstance(obj, OrderedDict) else None


class KeptVersions(OrderedDict):
    """A state dict's module versions (``_metadata``) that telepathy built and never changes in place (it makes
    new ones when a module changes): while it is the same object, it holds the same versions."""


def with_module_versions(state_dict: Mapping[Any, Any], versions: Any) -> OrderedDict[Any, Any]:
    """``state_dict`` as an OrderedDict carrying ``versions`` as its ``_metadata``, the way torch makes one."""
    copy = OrderedDict(state_dict)
    copy._metadata = OrderedDict(versions)  # type: ignore[attr-defined]
    return copy


def leaves(obj: Any) -> list[Any]:
    """Every non-container value of ``obj``, in walking order."""
    found: list[Any] = []

    def collect(value: Any, path: str) -> Any:
        if not isinstance(value, (Mapping, list, tuple, set, frozenset)):
            found.append(value)
        return KEEP

    transform(obj, collect)
    return found


class TooLarge(ValueError):
    """A structure has more values than a walk may visit."""


def visit(obj: Any, fn: Callable[[Any], None], *, limit: int | None = None) -> int:
    """Call ``fn`` on every value of ``obj`` (containers included), without copying anything; a value reached
    twice through shared references is visited twice, so ``limit`` bounds the work on hostile input (raises
    :class:`TooLarge`). Returns the number of visits."""
    stack, visits = [obj], 0
    while stack:
        value = stack.pop()
        visits += 1
        if limit is not None and visits > limit:
            raise TooLarge(f"more than {limit:,} values")
        fn(value)
        if isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(value)
    return visits


def depth(obj: Any, limit: int) -> int:
    """How deeply containers nest in ``obj`` (a plain value: 0), without recursion; raises :class:`TooLarge` past
    ``limit`` levels. The other walks here recurse: a hostile 100,000-level structure must be refused first."""
    stack, deepest = [(obj, 0)], 0
    while stack:
        value, level = stack.pop()
        if isinstance(value, Mapping):
            children = value.values()
        elif isinstance(value, (list, tuple, set, frozenset)):
            children = value
        else:
            continue
        if level + 1 > limit:
            raise TooLarge(f"containers nested more than {limit} deep")
        deepest = max(deepest, level + 1)
        stack.extend((child, level + 1) for child in children)
    return deepest
