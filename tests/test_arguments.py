"""Every public class checks every argument in ``__init__``: a wrong value fails at once, naming the argument.

The arguments are read from the signatures, so a new argument is covered the day it is added. Hypothesis draws
wrong values by the argument's kind (from its annotation): a string, a float or a bool for an int; NaN, infinity
or a string for a float; 0/1 or "yes" for a bool; an unknown word for a choice; a number for a name. Numbers that
no argument of this suite may take (negative counts and scales) are drawn too, except where :data:`NEGATIVE_OK`
says the argument means a sign. The control: each default, passed explicitly, is accepted.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ext import callbacks, optimizers
from lightning_ext.optimizers import cli as optimizers_cli

#: constructor arguments that are not hyper-parameters (the model, the parameters, the base optimizer)
NOT_HYPERPARAMETERS = {"self", "params", "optimizer", "constrained", "model", "prunable", "batchnorm",
                       "calibration_dataloader", "compander_args"}
#: arguments whose value is a free-form name (a module, an attribute, a path): only their type can be checked
#: before the model is known; the name itself is checked at setup (a name that matches nothing lists what exists)
FREE_FORM = {"heads", "attr", "module", "checkpoint_dir", "compander", "ckpt_path"}
#: ints that may be negative
NEGATIVE_OK = {"sign"}
#: arguments that take more than one kind (EVA's use_label_mask is True, False or "auto")
MIXED = {"use_label_mask"}


def _linear() -> torch.nn.Linear:
    return torch.nn.Linear(3, 3)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def _cram_optimizer(**kw):
    model = _linear()
    return optimizers.CrAM(_sgd(model.parameters()), model=model, **kw)


def _lawn_optimizer(**kw):
    model = _linear()
    return optimizers.LAWN(_sgd(model.parameters()), [model.weight], **{"free_steps": 1, **kw})


def _callback(cls):
    def build(**kw):
        return cls(**kw)
    return build


#: how to build each public class with one argument changed (the rest at their defaults)
BUILDERS = {
    **{name: _callback(getattr(callbacks, name)) for name in callbacks.__all__
       if name not in ("Technique", "LAWN", "LoadWeights")},
    "LoadWeights": lambda **kw: callbacks.LoadWeights(**{"ckpt_path": "run.ckpt", **kw}),
    "callbacks.LAWN": lambda **kw: callbacks.LAWN(**{"free_steps": 1, **kw}),
    "AdamP": lambda **kw: optimizers.AdamP(_linear().parameters(), **kw),
    "SGDP": lambda **kw: optimizers.SGDP(_linear().parameters(), **{"lr": 0.1, **kw}),
    "FAdam": lambda **kw: optimizers.FAdam(_linear().parameters(), **kw),
    "optimizers.CrAM": _cram_optimizer,
    "optimizers.LAWN": _lawn_optimizer,
    "cli.CrAM": lambda **kw: optimizers_cli.CrAM(_linear().parameters(), _sgd, **kw),
    "cli.LAWN": lambda **kw: optimizers_cli.LAWN(_linear().parameters(), _sgd, **{"free_steps": 1, **kw}),
}
CLASSES = {"callbacks.LAWN": callbacks.LAWN, "optimizers.CrAM": optimizers.CrAM, "optimizers.LAWN": optimizers.LAWN,
           "cli.CrAM": optimizers_cli.CrAM, "cli.LAWN": optimizers_cli.LAWN, "AdamP": optimizers.AdamP,
           "SGDP": optimizers.SGDP, "FAdam": optimizers.FAdam,
           **{name: getattr(callbacks, name) for name in callbacks.__all__ if name not in ("Technique", "LAWN")}}


def _kind(annotation: str) -> str:
    first = annotation.split("|")[0].strip()
    if first == "str" and "list[str]" in annotation:
        return "names"
    if first.startswith("list[str]"):
        return "names"
    return first


def _arguments():
    out = []
    for key, cls in sorted(CLASSES.items()):
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name in NOT_HYPERPARAMETERS or name in MIXED:
                continue
            kind = _kind(str(p.annotation))
            if kind in ("int", "float", "bool", "str", "names", "list[float]", "list[list[int]]", "Sequence[float]",
                        "Sequence[tuple[int, int]]", "tuple[float, float]"):
                out.append(pytest.param(key, name, kind, "None" in str(p.annotation), p.default,
                                        id=f"{key}-{name}"))
    return out


def _wrong(kind: str, name: str, optional: bool) -> st.SearchStrategy:
    words = st.text(min_size=1, max_size=6)
    if kind == "int":
        wrong = [words, st.floats(allow_nan=True), st.booleans()]
        if name not in NEGATIVE_OK:
            wrong.append(st.integers(max_value=-1))
    elif kind == "float":
        wrong = [words, st.just(math.nan), st.just(math.inf), st.booleans(), st.floats(max_value=-1e-6)]
    elif kind == "bool":
        wrong = [st.integers(), words, st.just(None)] if not optional else [st.integers(), words]
    elif kind == "str" and name in FREE_FORM:
        wrong = [st.integers(), st.floats(), st.just("")]
    elif kind == "str":
        wrong = [words.map(lambda s: f"not-an-option-{s}"), st.integers()]
    elif kind == "names":
        wrong = [st.integers(), st.just(""), st.lists(st.integers(), min_size=1, max_size=2)]
    else:  # sequences of numbers
        wrong = [words, st.integers(), st.lists(words, min_size=1, max_size=2)]
    if not optional and kind != "bool":
        wrong.append(st.just(None))
    return st.one_of(wrong)


@pytest.mark.parametrize("key, name, kind, optional, default", _arguments())
def test_a_wrong_value_fails_in_init_naming_the_argument(key, name, kind, optional, default):
    build = BUILDERS[key]
    if default is not inspect.Parameter.empty:
        build(**{name: default})  # the control: the default, passed explicitly, is accepted

    @settings(max_examples=15, deadline=None, derandomize=True)
    @given(_wrong(kind, name, optional))
    def check(value):
        with pytest.raises(ValueError, match=rf"^{name} must be"):
            build(**{name: value})

    check()


def test_every_public_class_is_covered():
    covered = {key for key, *_ in (p.values for p in _arguments())}
    assert covered == set(CLASSES) - {"Technique", "Manifest"}  # Manifest takes no argument


@pytest.mark.parametrize("technique", ["CrAM", "LAWN"])
def test_the_three_forms_of_a_wrapper_share_their_defaults(technique):
    """CrAM and LAWN exist as an optimizer, a callback and a YAML section; each default is written once, in the
    hyper-parameter dataclass, and every form's signature shows the same value."""
    from lightning_ext.optimizers import cram, lawn

    defaults = {"CrAM": cram.CRAM_DEFAULTS, "LAWN": lawn.LAWN_DEFAULTS}[technique]
    forms = [getattr(optimizers, technique), getattr(callbacks, technique), getattr(optimizers_cli, technique)]
    fields = [f for f in defaults.__dataclass_fields__ if f != "free_steps"]
    for form in forms:
        signature = inspect.signature(form.__init__).parameters
        for field in fields:
            assert field in signature, f"{form.__module__}.{form.__name__} lacks {field}"
            shown = signature[field].default
            if shown is None:  # the callback takes None for "the default list" and stores what it resolved to
                shown = form().kwargs[field]
            assert _tuples(shown) == _tuples(getattr(defaults, field)), f"{form.__module__}.{form.__name__}.{field}"


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
