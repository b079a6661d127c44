"""Find modules by name pattern and/or type, and replace them all-or-nothing.

Patterns follow peft's ``target_modules`` rules, which users of LoRA already know: a single
string is a regular expression that must match the *full* module name; a list of strings
matches a module whose name equals an entry or ends with ``"." + entry``. ``types`` are
module classes or their import paths (``"torch.nn.Linear"``, usable from YAML).

:func:`replace_modules` builds every replacement before it installs any, so a factory that
raises leaves the model exactly as it was; a replacement that reuses the old module's
``Parameter`` objects keeps their identity (and their optimizer state, if any). Composer's
``module_surgery`` is the example this follows; no library offers it for plain torch modules.

Every entry of a list must match: a target entry at least one module of the requested types, an
``exclude`` entry at least one module. peft accepts ``target_modules=["qurey", "value"]`` and adapts
``value`` only; here that is refused, naming the entry and the closest existing names. The one exception is
the default ``exclude`` of the quantizers, :data:`OUTPUT_HEADS`: a list of usual head names, most of which a
given model lacks.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import re
from collections.abc import Callable, Iterator, Sequence

from torch import nn

Patterns = str | Sequence[str] | None

#: names of output heads (peft-style suffixes) that quantization techniques keep in full precision by default
OUTPUT_HEADS = ("lm_head", "head", "classifier", "output")
Types = Sequence[type[nn.Module] | str] | type[nn.Module] | str | None


class SurgeryError(ValueError):
    """A selection matched nothing, or a replacement could not be applied (model left unchanged)."""


def _resolve_types(types: Types) -> tuple[type[nn.Module], ...]:
    if types is None:
        return ()
    if isinstance(types, (str, type)):
        types = [types]
    resolved = []
    for t in types:
        if isinstance(t, str):
            module_name, _, cls_name = t.rpartition(".")
            try:
                t = getattr(importlib.import_module(module_name), cls_name)
            except (ImportError, AttributeError, ValueError) as err:
                raise SurgeryError(f"types: cannot import {t!r} ({err})") from err
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise SurgeryError(f"types: {t!r} is not an nn.Module subclass")
        resolved.append(t)
    return tuple(resolved)


def name_matches(name: str, patterns: Patterns) -> bool:
    """peft's rule: a string is a full-match regex; a list matches by equality or ``.suffix``."""
    if patterns is None:
        return True
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def describe_modules(root: nn.Module, limit: int = 200) -> str:
    rows = [f"  {name} ({type(m).__name__})" for name, m in root.named_modules() if name]
    more = f"\n  ... and {len(rows) - limit} more" if len(rows) > limit else ""
    return "\n".join(rows[:limit]) + more


def select_modules(root: nn.Module, patterns: Patterns = None, types: Types = None,
                   exclude: Patterns = None, what: str = "target") -> list[tuple[str, nn.Module]]:
    """Modules of ``root`` (the root itself excluded) whose name matches ``patterns`` and whose type
    is one of ``types``, minus those matching ``exclude``. Raises :class:`SurgeryError` listing
    the existing module names when nothing matches."""
    if patterns is None and types is None:
        raise SurgeryError(f"{what}: give name patterns, types, or both")
    if isinstance(patterns, Sequence) and not isinstance(patterns, str) and len(patterns) == 0:
        raise SurgeryError(f"{what}: the list of name patterns is empty")
    type_tuple = _resolve_types(types)
    named = [(name, m) for name, m in root.named_modules() if name]
    names = [name for name, _ in named]
    typed = [name for name, m in named if not type_tuple or isinstance(m, type_tuple)]
    _every_entry_matches(root, names, what, patterns, typed, type_tuple)
    if exclude is None or isinstance(exclude, str) or tuple(exclude) != OUTPUT_HEADS:
        _every_entry_matches(root, names, f"{what.rpartition(' ')[0] or what} exclude", exclude, names, ())
    selected = [(name, m) for name, m in named
                if name_matches(name, patterns) and (not type_tuple or isinstance(m, type_tuple))
                and not (exclude is not None and name_matches(name, exclude))]
    if not selected:
        wanted = " and ".join(s for s in (f"names {patterns!r}" if patterns is not None else "",
                                          f"types {[t.__name__ for t in type_tuple]}" if type_tuple else "") if s)
        excl = f" (excluding {exclude!r})" if exclude is not None else ""
        owners = sorted({technique_of(m) for _, m in named if technique_of(m)})
        taken = (f" Layers of {', '.join(owners)} are there already: two techniques that rewrite the same layers "
                 "do not compose.") if owners else ""
        raise SurgeryError(f"{what}: no module matches {wanted}{excl}.{taken} Modules that exist:\n"
                           f"{describe_modules(root)}")
    return selected


def _every_entry_matches(root: nn.Module, names: list[str], what: str, patterns: Patterns, candidates: list[str],
                         type_tuple: tuple[type[nn.Module], ...]) -> None:
    """Raise naming the first entry of a pattern list that matches none of ``candidates``, with the closest of
    ``names`` (every module name of ``root``: a full name or its peft-style suffixes)."""
    if patterns is None or isinstance(patterns, str):
        return
    for pattern in patterns:
        if any(name_matches(name, [pattern]) for name in candidates):
            continue
        suffixes = sorted({".".join(parts[i:]) for parts in (name.split(".") for name in names)
                           for i in range(len(parts))})
        close = difflib.get_close_matches(pattern, suffixes, n=3, cutoff=0.5)
        kind = f" of type {'/'.join(t.__name__ for t in type_tuple)}" if type_tuple else ""
        hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
        raise SurgeryError(f"{what}: {pattern!r} matches no module{kind}{hint}. Every entry must match (the "
                           f"others would apply without it). Modules that exist:\n{describe_modules(root)}")


def technique_of(module: nn.Module) -> str | None:
    """The technique whose surgery installed ``module`` (its class's ``surgery_technique``) or reparameterized it
    (a ``torch.nn.utils.parametrize`` parametrization whose class names one), if any."""
    owner = getattr(type(module), "surgery_technique", None)
    if owner is None and hasattr(module, "parametrizations"):
        owners = [getattr(type(p), "surgery_technique", None) for plist in module.parametrizations.values()
                  for p in plist]
        owner = next((o for o in owners if o is not None), None)
    return owner


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def replace_modules(root: nn.Module, targets: Sequence[str] | Sequence[tuple[str, nn.Module]],
                    factory: Callable[[str, nn.Module], nn.Module], technique: str | None = None) -> dict[str, nn.Module]:
    """Replace each named submodule by ``factory(name, old)``; all or nothing.

    Every replacement is built first; if any factory call raises, nothing is installed and a
    :class:`SurgeryError` names the module that failed. Targets nested inside other targets are
    refused (replacing the outer one would orphan the inner replacement).

    ``technique``: the caller's name, for the refusal when a module another technique installed or
    reparameterized cannot be replaced (the new module's class names it otherwise).

    Returns ``{name: new_module}``.
    """
    names = [t if isinstance(t, str) else t[0] for t in targets]
    if not names:
        raise SurgeryError("replace_modules: no targets given")
    if len(set(names)) != len(names):
        raise SurgeryError(f"replace_modules: duplicate targets {sorted({n for n in names if names.count(n) > 1})}")
    for a in names:
        for b in names:
            if b != a and b.startswith(a + "."):
                raise SurgeryError(f"replace_modules: target {b!r} lies inside target {a!r}; select one of them")
    new_modules = {}
    for name in names:
        try:
            old = root.get_submodule(name)
        except AttributeError as err:
            raise SurgeryError(f"replace_modules: {root.__class__.__name__} has no submodule {name!r}. "
                               f"Modules that exist:\n{describe_modules(root)}") from err
        owner = technique_of(old)
        try:
            new = factory(name, old)
        except Exception as err:
            if owner is not None and owner != technique:
                raise _collision(technique or "this surgery", owner, name, old) from err
            raise SurgeryError(f"replacing {name!r} ({type(old).__name__}) failed, model left unchanged: "
                               f"{type(err).__name__}: {err}") from err
        if not isinstance(new, nn.Module):
            raise SurgeryError(f"the factory returned {type(new).__name__} for {name!r}, not an nn.Module; "
                               "model left unchanged")
        incoming = technique_of(new) or technique
        if owner is not None and incoming is not None and owner != incoming:
            raise _collision(incoming, owner, name, old)
        new_modules[name] = new
    for name, new in new_modules.items():
        _set_submodule(root, name, new)
    return new_modules


def _collision(incoming: str, owner: str, name: str, old: nn.Module) -> SurgeryError:
    return SurgeryError(f"{incoming} and {owner} both rewrite {name!r}, which is already a {owner} layer "
                        f"({type(old).__name__}); they do not compose on one layer. Exclude it from one of them "
                        f"(targets / exclude); model left unchanged")


def is_zero3_partitioned(module: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the parameters (they carry ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def gathered_parameters(module: nn.Module, modifier_rank: int | None = None) -> Iterator[None]:
    """Full weights inside the block, under ZeRO-3 (``deepspeed.zero.GatheredParameters``) or not.

    With ``modifier_rank`` set, changes made on that rank are broadcast to the partitions on exit.
    """
    if not is_zero3_partitioned(module):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=modifier_rank):
        yield
