"""Adapter callbacks on peft: LoRA, EVA, Bone — structure, init properties, exact save/load and merge."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_ext.callbacks import EVA, Bone, GoRA, LoRA, LoTR
from lightning_ext.nn.gora import allocate_ranks, gora_b_init
from lightning_ext.data import TweetSentimentDataModule
from lightning_ext.models import TextClassifier
from lightning_ext.surgery import SurgeryError

HEAD = ["classifier"]


def _fit(cb, steps=0, tmp_path=None, dm=None, model=None):
    model = model or TextClassifier()
    trainer = pl.Trainer(max_steps=steps, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(model, dm if dm is not None else TweetSentimentDataModule())
    return model, trainer


def _batch():
    dm = TweetSentimentDataModule()
    dm.setup()
    return next(iter(dm.val_dataloader()))


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.model.named_parameters() if "classifier" not in n}


def _lora_layers(peft_model):
    return [(n, m) for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


@pytest.mark.parametrize("make", [lambda: LoRA(modules_to_save=HEAD), lambda: EVA(modules_to_save=HEAD),
                                  lambda: Bone(modules_to_save=HEAD), lambda: Bone(mode="bone", modules_to_save=HEAD),
                                  lambda: GoRA(r=4, modules_to_save=HEAD), lambda: LoTR(r=8, modules_to_save=HEAD)],
                         ids=["lora", "eva", "bone-bat", "bone", "gora", "lotr"])
def test_adapter_trains_only_itself_saves_reloads_and_merges_exactly(make, tmp_path):
    from peft import PeftModel

    reference = TextClassifier().eval()
    base = _base_weights(reference)
    batch = _batch()
    with torch.no_grad():
        base_logits = reference(batch["input_ids"], batch["attention_mask"])
    cb = make()
    model, _ = _fit(cb, steps=0, tmp_path=tmp_path)  # setup only: the init
    model.eval()
    with torch.no_grad():  # zero update at init (B = 0 / zero blocks): outputs equal the base model
        init_logits = model(batch["input_ids"], batch["attention_mask"])
    if isinstance(cb, GoRA):  # GoRA starts one compressed gradient step away
        assert not torch.allclose(init_logits, base_logits, atol=1e-6)
    else:
        torch.testing.assert_close(init_logits, base_logits, rtol=0, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "miss_" in n or "lotr_" in n or "classifier" in n) for n in trainable)
    cb2 = make()
    model, _ = _fit(cb2, steps=5, tmp_path=tmp_path)
    model.eval()
    peft_model = model.model
    base_after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                  for n, p in peft_model.named_parameters() if "lora_" not in n and "miss_" not in n
                  and "lotr_" not in n and "classifier" not in n}
    assert all(torch.equal(base_after[n], v) for n, v in base.items())
    with torch.no_grad():
        trained = model(batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(trained, base_logits, atol=1e-4)  # it trained
    cb2.save_adapter(model, tmp_path / "adapter")
    fresh = TextClassifier()  # the same base; a different head: the saved head must replace it
    torch.nn.init.normal_(fresh.model.classifier.weight)
    reloaded = PeftModel.from_pretrained(fresh.model, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           trained)
    merged = cb2.merge(model)
    assert not any("lora_" in n or "miss_" in n or "lotr_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(batch["input_ids"], batch["attention_mask"]), trained, rtol=1e-5, atol=1e-5)


def test_eva_init_orthonormal_rows_zero_b_and_budget(tmp_path):
    model, _ = _fit(EVA(r=4, rho=2.0, modules_to_save=HEAD, target_modules=["query", "value", "attention.output.dense"]),
                    tmp_path=tmp_path)
    layers = _lora_layers(model.model)
    total = 0
    for _, m in layers:
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        torch.testing.assert_close(a @ a.t(), torch.eye(a.shape[0]), rtol=0, atol=1e-5)
        assert torch.equal(b, torch.zeros_like(b))
        total += a.shape[0]
    assert total == 4 * len(layers)  # the budget is kept (redistributed, not grown)
    assert len({m.lora_A["default"].weight.shape[0] for _, m in layers}) > 1  # and redistributed here


def test_eva_refuses_label_mask_with_classification_labels_and_missing_data(tmp_path):
    with pytest.raises(ValueError, match="token-level labels"):
        _fit(EVA(use_label_mask=True, modules_to_save=HEAD), tmp_path=tmp_path)
    trainer = pl.Trainer(max_steps=1, callbacks=[EVA(modules_to_save=HEAD)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="needs calibration data"):
        trainer.fit(TextClassifier(), TweetSentimentDataModule().train_dataloader())


def test_bad_targets_and_arguments_are_refused(tmp_path):
    with pytest.raises(SurgeryError, match="Modules that exist"):
        _fit(LoRA(target_modules=["nope"]), tmp_path=tmp_path)
    # one misspelt entry of several: peft alone adapts `value` only (37.6 K trainable parameters, not 74.5 K)
    with pytest.raises(SurgeryError, match=r"LoRA target_modules: 'qurey' matches no module; closest: 'query'"):
        _fit(LoRA(target_modules=["qurey", "value"]), tmp_path=tmp_path)
    with pytest.raises(SurgeryError, match="divide in and out"):
        _fit(Bone(r=48, mode="bat"), tmp_path=tmp_path)
    with pytest.raises(ValueError, match="mode must be one of"):
        Bone(mode="bone3")
    with pytest.raises(ValueError, match="rho"):
        EVA(rho=0.5)


def test_gora_rank_allocation_bounds_budget_and_order():
    shapes = {"a": (64, 64), "b": (64, 64), "c": (64, 256), "d": (64, 64)}
    ranks = allocate_ranks({"a": 1.0, "b": 3.0, "c": 4.0, "d": 0.0}, shapes, r0=8, r_min=4, r_max=32)
    assert all(4 <= r <= 32 for r in ranks.values()) and ranks["d"] == 4 and ranks["b"] > ranks["a"]
    budget = 8 * sum(m + n for m, n in shapes.values())
    used = sum(r * sum(shapes[k]) for k, r in ranks.items())
    assert used <= budget * 1.15  # not renormalised after clipping (d is lifted to r_min), as the reference
    assert allocate_ranks({"a": 1.0, "b": 1.0}, {"a": (8, 8), "b": (8, 8)}, 4, 1, 16) == {"a": 4, "b": 4}
    with pytest.raises(ValueError, match="r_min <= r0 <= r_max"):
        allocate_ranks({"a": 1.0}, {"a": (8, 8)}, 4, 5, 16)


def test_gora_b_gives_one_compressed_gradient_step():
    g = torch.randn(48, 32, dtype=torch.float64)
    a = torch.randn(6, 32, dtype=torch.float64)
    scaling = 16 / 6 ** 0.5
    for sign in (-1, 1):
        b = gora_b_init(g, a, gamma=0.05, scaling=scaling, sign=sign)
        projector = a.t() @ torch.linalg.inv(a @ a.t()) @ a
        torch.testing.assert_close(scaling * b @ a, sign * 0.05 * (32 / 6) ** 0.5 * g @ projector)


def test_gora_callback_ranks_in_bounds_base_untouched_sign_option(tmp_path):
    targets = ["query", "value", "attention.output.dense"]
    base = _base_weights(TextClassifier())
    deltas = {}
    for sign in (-1, 1):
        cb = GoRA(r=4, r_min=2, r_max=8, sign=sign, target_modules=targets, modules_to_save=HEAD)
        model, _ = _fit(cb, tmp_path=tmp_path)
        ranks = cb.state["rank_pattern"]
        assert len(ranks) == 6 and all(2 <= r <= 8 for r in ranks.values()) and len(set(ranks.values())) > 1
        layers = dict(_lora_layers(model.model))
        for name, r in ranks.items():
            layer = layers[f"base_model.model.{name}"]
            assert layer.lora_A["default"].weight.shape[0] == r
            assert layer.scaling["default"] == pytest.approx(16 / r ** 0.5)  # rsLoRA with the real rank
        deltas[sign] = {n: (m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight).detach()
                        for n, m in layers.items()}
        after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                 for n, p in model.model.named_parameters() if "lora_" not in n and "classifier" not in n}
        assert all(torch.equal(after[n], v) for n, v in base.items())
    for name, delta in deltas[-1].items():  # same A (seeded), same gradient: the sign flips the step
        assert delta.abs().max() > 0
        torch.testing.assert_close(deltas[1][name], -delta)


def test_lotr_shares_factors_counts_parameters_and_exports_to_lora_exactly(tmp_path):
    from peft import PeftModel

    cb = LoTR(r=8, modules_to_save=HEAD, target_modules=["query", "value", "attention.output.dense"])
    model, _ = _fit(cb, steps=5, tmp_path=tmp_path)
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]
    shared = [n for n in names if "lotr_L" in n or "lotr_R" in n]
    assert len(shared) == 2  # one (L, R) pair: every target here is 64 x 64
    adapter = sum(p.numel() for n, p in model.named_parameters() if n in names)
    d, layers = 64, 6
    assert adapter == 8 * (d + d) + layers * 8 * 8  # r (in + out) + D r^2, vs LoRA's D r (in + out)
    batch = _batch()
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"])
    cb.export_lora(model, tmp_path / "as_lora")
    lora = PeftModel.from_pretrained(TextClassifier().model, tmp_path / "as_lora").eval()
    assert lora.peft_config["default"].peft_type == "LORA"
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   out, rtol=1e-5, atol=1e-5)


def _quantized_base(model):
    """What a quantized base layer computes with, by module name: the dequantized 4-bit weight (bitsandbytes
    may re-lay-out packed storage, so storage alone is not the test), or the int8 codes and their scales."""
    import bitsandbytes as bnb

    out = {}
    for name, m in model.named_modules():
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        if isinstance(m, bnb.nn.Linear4bit):
            out[key] = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).clone()
        elif isinstance(m, bnb.nn.Linear8bitLt):
            scales = m.weight.SCB if m.weight.SCB is not None else m.state.SCB  # moved to the state by a forward
            out[key] = torch.cat([m.weight.data.flatten().float(), scales.flatten().float()]).clone()
    return out


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_base_trains_or_is_refused_by_name(bits, tmp_path):
    """QLoRA-style: a bitsandbytes 4/8-bit base (CPU). LoRA, EVA, Bone(bone), LoTR train — with a validation
    pass (eval mode, no grad) before and between the training steps — and leave the quantized base bit-identical
    (dequantized weights). GoRA and Bone(bat), which need the full-precision base weight, refuse naming the layers.

    With bitsandbytes 0.50 on an AVX512-BF16 CPU (this machine), an eval-mode forward without grad re-packs a
    4-bit weight for inference, lossily, and later training forwards through it drop the input gradient or
    fail: without ``lightning_ext._bnb_compat.keep_training_layout`` this test fails (EVA raises, LoRA changes
    layer 0's query/key/value)."""
    base_dir = tmp_path / "base"
    TextClassifier(dropout=0.0).model.save_pretrained(base_dir)
    for make in (lambda: LoRA(r=4, modules_to_save=HEAD), lambda: EVA(r=4, modules_to_save=HEAD),
                 lambda: Bone(mode="bone", modules_to_save=HEAD), lambda: LoTR(r=4, modules_to_save=HEAD)):
        model = TextClassifier(model_path=str(base_dir), quantization=bits)
        frozen = _quantized_base(model.model)
        assert len(frozen) == 13  # the base really is quantized: 6 linear layers in each of 2 blocks + pooler
        assert all(m.training for m in model.modules())  # trained in train mode (from_pretrained gives eval)
        trainer = pl.Trainer(max_steps=3, callbacks=[make()], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                             val_check_interval=1, default_root_dir=tmp_path)
        trainer.fit(model, TweetSentimentDataModule())
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all(p.is_floating_point() for p in trained.values())
        still = _quantized_base(model.model)
        assert still.keys() == frozen.keys() and all(torch.equal(still[n], v) for n, v in frozen.items())
    for make, message in ((lambda: GoRA(r=4, modules_to_save=HEAD), "GoRA needs the full-precision gradient"),
                          (lambda: Bone(mode="bat", modules_to_save=HEAD), "rewrites the full-precision base")):
        with pytest.raises(ValueError, match=message):
            _fit(make(), tmp_path=tmp_path, model=TextClassifier(model_path=str(base_dir), quantization=bits))


def test_keep_training_layout_stops_and_undoes_the_cpu_inference_repack():
    """bitsandbytes' CPU inference re-pack (eval mode, no grad, AVX512-BF16 CPUs) is switched off, and a layer
    re-packed earlier is put back in the standard layout, which trains (input gradient = dense reference)."""
    bnb = pytest.importorskip("bitsandbytes")
    from lightning_ext._bnb_compat import keep_training_layout

    def layer():
        torch.manual_seed(0)
        q = bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.float32)
        q.weight = bnb.nn.Params4bit(torch.randn(64, 64) / 8, requires_grad=False)
        q.bias = torch.nn.Parameter(torch.randn(64), requires_grad=False)
        return torch.nn.Sequential(q.to("cpu"))

    model = layer()
    standard = model[0].weight.data.clone()
    assert keep_training_layout(model) == []
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 64))
    assert not getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(model[0].weight.data, standard)

    model = layer().eval()
    with torch.no_grad():
        model(torch.randn(4, 64))  # re-packed here on an AVX512-BF16 CPU, left as is elsewhere
    packed = getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)
    assert keep_training_layout(model) == (["0"] if packed else [])
    assert torch.equal(model[0].weight.data, standard)
    x = torch.randn(4, 64, requires_grad=True)
    model.train()(x).sum().backward()
    dense = bnb.functional.dequantize_4bit(model[0].weight.data, model[0].weight.quant_state)
    torch.testing.assert_close(x.grad, dense.sum(0).expand(4, -1))


def _tweet_loader():
    dm = TweetSentimentDataModule(batch_size=16, seed=1)
    dm.setup()
    return dm.train_dataloader()  # a new loader object each call


def test_eva_resumes_exactly_when_given_its_own_calibration_loader(tmp_path):
    """The loader is data, not configuration: not in the manifest, and another loader object on resume is
    not a changed argument (the resume check used to compare the loaders by identity and refuse)."""
    from harness import resume_differences
    from registry import BY_NAME, Entry

    eva = BY_NAME["eva"]
    entry = Entry(name="eva_loader", model=eva.model, data=eva.data, steps=6, resume_at=3,
                  callbacks=lambda: [EVA(r=4, modules_to_save=HEAD, calibration_dataloader=_tweet_loader())])
    assert resume_differences(entry, tmp_path) == []
    assert "calibration_dataloader" not in EVA().state_key


class _TwoEncoders(TextClassifier):
    """Two small BERTs summed: two models to adapt in one LightningModule."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0, hidden_size=32, num_layers=1)
        import copy

        self.second = copy.deepcopy(self.model)
        torch.nn.init.normal_(self.second.classifier.weight)

    def forward(self, input_ids, attention_mask=None):
        return super().forward(input_ids, attention_mask) + self.second(input_ids=input_ids,
                                                                        attention_mask=attention_mask).logits


def test_two_adapters_on_two_models_live_in_one_trainer_and_resume_exactly(tmp_path):
    from harness import resume_differences
    from registry import BY_NAME, Entry

    make = lambda: [LoRA(r=2, attr="model", modules_to_save=HEAD), LoRA(r=4, attr="second")]  # noqa: E731
    first, second = make()
    assert first.state_key != second.state_key
    entry = Entry(name="two_loras", model=_TwoEncoders, data=BY_NAME["lora"].data, steps=6, resume_at=3,
                  callbacks=make)
    assert resume_differences(entry, tmp_path) == []
    model, _ = _fit(make()[0], tmp_path=tmp_path, model=_TwoEncoders())
    with pytest.raises(ValueError, match=r"already adapted by LoRA.*one adapter callback per model"):
        _fit(LoRA(r=4, attr="model", target_modules=["key"]), tmp_path=tmp_path, model=model)


def test_each_adapter_has_its_own_name_and_a_checkpoint_of_one_refuses_another(tmp_path):
    """Before: all five shared their base's name ``_PeftAdapter`` in the manifest and in error messages."""
    names = {c.technique_name for c in (LoRA, EVA, GoRA, Bone, LoTR)}
    assert names == {"LoRA", "EVA", "GoRA", "Bone", "LoTR"}
    _, trainer = _fit(LoRA(r=4, modules_to_save=HEAD), steps=1, tmp_path=tmp_path)
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    message = r"trained with techniques \[.LoRA.*that this trainer does not have \(it has \[.Bone"
    with pytest.raises(RuntimeError, match=message):
        pl.Trainer(max_steps=2, callbacks=[Bone(modules_to_save=HEAD)], logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path / "bone").fit(
            TextClassifier(), TweetSentimentDataModule(), ckpt_path=str(tmp_path / "lora.ckpt"))
