"""Module selection and all-or-nothing replacement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ext.surgery import SurgeryError, gathered_parameters, name_matches, replace_modules, select_modules


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
                         nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), nn.Linear(8, 2))


class ScaledLinear(nn.Linear):
    """A class swap that keeps the weight Parameter (as QAT layers do)."""

    @classmethod
    def from_linear(cls, old: nn.Linear) -> ScaledLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = old.in_features, old.out_features
        new.weight, new.bias = old.weight, old.bias
        return new

    def forward(self, x):
        return 2 * super().forward(x)


def test_peft_pattern_rules():
    assert name_matches("encoder.layer.0.q_proj", ["q_proj"])
    assert not name_matches("encoder.layer.0.q_proj_x", ["q_proj"])
    assert name_matches("encoder.layer.0.q_proj", r".*layer\.0\.q_proj")
    assert not name_matches("encoder.layer.10.q_proj", r".*layer\.0\.q_proj")


def test_select_by_pattern_type_and_exclude():
    model = _model()
    assert [n for n, _ in select_modules(model, types=[nn.Linear])] == ["0", "2.0", "3"]
    assert [n for n, _ in select_modules(model, types="torch.nn.Linear", exclude=["3"])] == ["0", "2.0"]
    assert [n for n, _ in select_modules(model, patterns=r"2\..*")] == ["2.0", "2.1"]
    assert [n for n, _ in select_modules(model, patterns=r"2\..*", types=[nn.LayerNorm])] == ["2.1"]


def test_nothing_matches_lists_existing_modules():
    with pytest.raises(SurgeryError) as err:
        select_modules(_model(), patterns=["q_proj"], types=[nn.Linear])
    message = str(err.value)
    assert "q_proj" in message and "Modules that exist" in message
    for name in ("0 (Linear)", "2.0 (Linear)", "2.1 (LayerNorm)", "3 (Linear)"):
        assert name in message


def test_bad_type_names_fail_clearly():
    with pytest.raises(SurgeryError, match="torch.nn.Linearr"):
        select_modules(_model(), types="torch.nn.Linearr")
    with pytest.raises(SurgeryError, match="not an nn.Module"):
        select_modules(_model(), types="torch.Tensor")


def test_replacement_keeps_parameter_identity_and_changes_behaviour():
    model = _model()
    x = torch.randn(3, 4)
    before = model(x)
    weight = model[0].weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    new = replace_modules(model, ["0"], lambda name, old: ScaledLinear.from_linear(old))
    assert isinstance(model[0], ScaledLinear) and new["0"] is model[0]
    assert model[0].weight is weight and model.get_parameter("0.weight") is weight
    assert any(p is weight for g in opt.param_groups for p in g["params"])
    assert not torch.allclose(model(x), before)


def test_failing_replacement_leaves_model_unchanged():
    model = _model()
    before = {n: type(m) for n, m in model.named_modules()}
    params = {n: p for n, p in model.named_parameters()}

    def factory(name, old):
        if name == "3":
            raise RuntimeError("cannot convert this one")
        return ScaledLinear.from_linear(old)

    with pytest.raises(SurgeryError, match=r"'3'.*unchanged.*cannot convert"):
        replace_modules(model, [n for n, _ in select_modules(model, types=[nn.Linear])], factory)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(model.get_parameter(n) is p for n, p in params.items())


def test_nested_duplicate_and_missing_targets_refused():
    model = _model()
    with pytest.raises(SurgeryError, match="inside"):
        replace_modules(model, ["2", "2.0"], lambda n, m: m)
    with pytest.raises(SurgeryError, match="duplicate"):
        replace_modules(model, ["0", "0"], lambda n, m: m)
    with pytest.raises(SurgeryError, match="no submodule 'q'"):
        replace_modules(model, ["q"], lambda n, m: m)
    with pytest.raises(SurgeryError, match="not an nn.Module"):
        replace_modules(model, ["0"], lambda n, m: 3)


def test_gathered_parameters_is_a_no_op_without_zero3():
    model = _model()
    with gathered_parameters(model):
        assert model[0].weight.shape == (8, 4)


def test_every_entry_of_a_pattern_list_must_match_and_the_closest_names_are_given():
    """Before this rule only a list where nothing matched was refused: ``["2.0", "2.00"]`` selected ``2.0``
    alone, and a misspelt ``exclude`` excluded nothing."""
    model = _model()
    with pytest.raises(SurgeryError, match=r"target: '2\.00' matches no module of type Linear; closest: '2\.0'"):
        select_modules(model, patterns=["2.0", "2.00"], types=[nn.Linear])
    with pytest.raises(SurgeryError, match=r"'1' matches no module of type Linear"):  # a ReLU is no target
        select_modules(model, patterns=["0", "1"], types=[nn.Linear])
    with pytest.raises(SurgeryError, match=r"QuEST exclude: '33' matches no module; closest: '3'"):
        select_modules(model, types=[nn.Linear], exclude=["3", "33"], what="QuEST targets")
    # a target entry that the exclude list removes again is the user's explicit choice, not a typo
    assert [n for n, _ in select_modules(model, patterns=["2.0", "3"], types=[nn.Linear], exclude=["3"])] == ["2.0"]


def test_the_default_output_head_list_is_exempt_from_the_rule():
    from lightning_ext.surgery import OUTPUT_HEADS

    # the quantizers' default exclude: usual head names, most of which a model lacks
    assert [n for n, _ in select_modules(_model(), types=[nn.Linear], exclude=list(OUTPUT_HEADS))] == ["0", "2.0", "3"]


@pytest.mark.parametrize("technique", ["QuEST", "OneBit", "WeightCompander", "LAWN", "CrAM"])
def test_a_misspelt_entry_is_refused_at_setup_by_each_technique(tmp_path, technique):
    """The failure the issue found (QuEST ``exclude: [lm_heda]`` quantized the head; LoRA ``[qurey, value]``
    trained ``value`` only — the adapters' check is in tests/test_adapters.py), for each technique with a list."""
    import lightning.pytorch as pl

    from lightning_ext import callbacks
    from lightning_ext.data import DigitsDataModule
    from lightning_ext.models import MLPClassifier

    args = {"QuEST": {"exclude": ["net.2", "net.22"]}, "OneBit": {"exclude": ["net.2", "net.22"]},
            "WeightCompander": {"targets": ["net.0", "net.22"]},
            "LAWN": {"layers": ["net.0", "net.22"], "free_steps": 1}, "CrAM": {"layers": ["net.0", "net.22"]}}[technique]
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[getattr(callbacks, technique)(**args)])
    model = MLPClassifier(hidden=[32])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError, match=r"'net\.22' matches no module.*closest: 'net\.2'"):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert model.state_dict().keys() == before.keys()  # refused before any surgery or step
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("order", [("QuEST", "OneBit"), ("OneBit", "QuEST")])
def test_two_techniques_rewriting_the_same_layers_refuse_at_setup_naming_both(tmp_path, order):
    """[QuEST, OneBit] used to replace every QuEST layer by a OneBit one without a word; in the other order
    QuEST found no nn.Linear left and said only that nothing matched."""
    import lightning.pytorch as pl

    from lightning_ext import callbacks
    from lightning_ext.data import DigitsDataModule
    from lightning_ext.models import MLPClassifier

    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[getattr(callbacks, name)(**({"block": 16} if name == "QuEST" else {}))
                                    for name in order])
    with pytest.raises(SurgeryError) as err:
        trainer.fit(MLPClassifier(hidden=[32]), datamodule=DigitsDataModule(batch_size=16))
    message = str(err.value)
    assert all(name in message for name in order) and "do not compose" in message, message


def test_a_technique_may_replace_its_own_layers():
    from lightning_ext.nn.quest import apply_quest, convert_quest

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    apply_quest(model, exclude=None, block=8)
    assert [type(m).__name__ for m in convert_quest(model).values()] == ["QuestInt", "QuestInt"]  # its export
