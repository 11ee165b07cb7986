"""LoRA through peft: adapters on the video, shared and text parts; training only them (and the
groups configured to train fully); zero-initialised adapters change nothing; merged equals
unmerged; adapter-only files in peft's format that load into a fresh base, into plain peft, and
from diffusers' and original Wan key layouts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from backbone_helpers import randomize_, tiny_config as tiny_model_config
from tolerances import assert_close_ordered, network_terms
from univigu.models import lora
from univigu.models.bundle import load_bundle
from univigu.models.transformer import UniViGUTransformer
from univigu.training import checkpoint as ckpt
from univigu.training.trainer import Trainer, TrainingError
from training_helpers import tiny_config, tiny_generator, training_cache  # noqa: F401 (fixtures)

SHARED_ATTENTION = "shared:attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0"


def _unified(seed=0, **overrides) -> UniViGUTransformer:
    config = tiny_model_config(vocab_size=17, text_length=6, text_query_projection=True, **overrides)
    return randomize_(UniViGUTransformer(config), seed).eval()


def _inputs(model, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    video = torch.randn(batch, c.in_channels, 1, 4, 6, generator=g)
    text = torch.randint(0, c.vocab_size, (batch, c.text_length), generator=g)
    ts = torch.tensor([300.0, 800.0])[:batch]
    cond = torch.randn(batch, 5, c.text_dim, generator=g)
    return video, text, ts, ts.flip(0), cond


def _randomize_adapters(model, seed=3, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _close(actual, expected, config):
    for a, e in zip(actual, expected):
        assert_close_ordered(a, e, terms=network_terms(config))


# --------------------------------------------------------------------------------------------
# Targets, zero init, merging
# --------------------------------------------------------------------------------------------


def test_targets_select_layers_by_group_and_pattern():
    model = _unified()
    names = lora.target_modules(model, [SHARED_ATTENTION, "video:ffn.*", "text:text_ffn.net.2"])
    blocks = model.config.num_layers
    assert len(names) == blocks * (4 + 2 + 1)
    assert "blocks.0.attn1.to_out.0" in names and "blocks.0.ffn.net.0.proj" in names
    assert "blocks.0.text_ffn.net.2" in names and "blocks.0.text_ffn.net.0.proj" not in names
    assert not any("attn2" in n or "text_to_q" in n for n in names)
    # a pattern only matches inside its own group: ffn.* of the text group is nothing
    with pytest.raises(lora.LoraError, match="match no linear layer"):
        lora.target_modules(model, ["text:ffn.*"])
    with pytest.raises(lora.LoraError, match="GROUP:PATTERN"):
        lora.target_modules(model, ["attn1.to_q"])


def test_zero_initialised_adapters_leave_outputs_unchanged_and_merged_equals_unmerged():
    model = _unified()
    inputs = _inputs(model)
    with torch.no_grad():
        base = model(*inputs)
        config = lora.make_config(model, 4, 8, targets=[SHARED_ATTENTION, "video:ffn.*", "text:text_ffn.*"])
        lora.add_adapter(model, config)
        zero = model(*inputs)
        assert all(torch.equal(a, b) for a, b in zip(zero, base))
        _randomize_adapters(model)
        unmerged = model(*inputs)
        assert (unmerged[0] - base[0]).abs().max() > 1e-3 and (unmerged[1] - base[1]).abs().max() > 1e-3
        lora.fuse(model)
        merged = model(*inputs)
        _close(merged, unmerged, model.config)
        lora.unfuse(model)
        _close(model(*inputs), unmerged, model.config)
        lora.unload(model, merge=True)
        assert not lora.lora_layers(model)
        assert set(model.state_dict()) == set(_unified().state_dict())
        _close(model(*inputs), unmerged, model.config)



def test_compiled_lora_forward_equals_the_eager_one():
    model = _unified(num_layers=1)  # one block: one compile
    lora.add_adapter(model, lora.make_config(model, 4, targets=[SHARED_ATTENTION, "text:text_ffn.*"]))
    _randomize_adapters(model)
    inputs = _inputs(model)
    with torch.no_grad():
        eager = model(*inputs)
        model.compile_blocks()
        compiled = model(*inputs)
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    _close(compiled, eager, model.config)

# --------------------------------------------------------------------------------------------
# Training with adapters
# --------------------------------------------------------------------------------------------

LORA_RUN = ("train.trainable=text", "train.lora.rank=4", "train.lora.alpha=8", f"train.lora.targets=[{SHARED_ATTENTION!r}]",
            "train.eval_samples=0", "train.lr=0.003")


def _lora_trainer(tmp_path, training_cache, tiny_generator, *extra, name="run"):
    cfg = tiny_config(tmp_path / name, training_cache, *LORA_RUN, *extra, stage="knowledge_recall",
                      init_from=tiny_generator)
    return Trainer(cfg, progress=False)


def test_only_adapters_and_configured_groups_train_and_the_export_merges_them(tmp_path, training_cache,
                                                                              tiny_generator):
    trainer = _lora_trainer(tmp_path, training_cache, tiny_generator, "train.steps=2")
    model = trainer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if lora.is_lora_parameter(n)}
    assert adapters and all(".attn1." in n for n in adapters)
    assert all(lora.is_lora_parameter(n) or model.parameter_group(n) == "text" for n in trainable)
    assert {n for n, p in model.named_parameters() if model.parameter_group(n) == "text"} <= trainable
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".base_layer." in n)
    trainer.train_step()
    state = trainer.optimizer.state  # who stepped (gradients are set to None after the step)
    names = {id(p): n for n, p in model.named_parameters()}
    with_grad = {names[id(p)] for p in state}
    assert with_grad == trainable
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable
    assert any(".lora_B." in k for k in changed)  # B starts at zero and moves

    out = trainer.run()
    adapter_dir = tmp_path / "run" / "adapter"
    config = json.loads((adapter_dir / lora.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(tiny_generator.resolve())
    saved = load_file(str(adapter_dir / lora.ADAPTER_WEIGHTS))
    assert all(lora.is_lora_parameter(k) and ".default." not in k and k.startswith("base_model.model.") for k in saved)
    full = load_file(str(adapter_dir / lora.FULL_WEIGHTS))
    assert set(full) == {n for n in trainable if not lora.is_lora_parameter(n)}

    merged = load_bundle(out).transformer.eval()  # a plain model directory
    assert not lora.lora_layers(merged)
    unmerged = trainer.ema_model(merge_lora=False)
    assert lora.lora_layers(unmerged)
    inputs = _inputs(merged)
    inputs = (torch.randn(2, merged.config.in_channels, 1, 4, 4), *inputs[1:])
    with torch.no_grad():
        _close(merged(*inputs), unmerged(*inputs), merged.config)


def test_lora_with_activation_checkpointing_trains_like_without(tmp_path, training_cache, tiny_generator):
    runs = []
    for flag in ("false", "true"):
        trainer = _lora_trainer(tmp_path, training_cache, tiny_generator, f"train.gradient_checkpointing={flag}",
                                name=f"ckpt-{flag}")
        logs = [trainer.train_step() for _ in range(2)]
        runs.append((logs, trainer.model.state_dict()))
    (logs_a, weights_a), (logs_b, weights_b) = runs
    assert [r["loss"] for r in logs_a] == [r["loss"] for r in logs_b]
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)

def test_lora_settings_are_checked(tmp_path, training_cache, tiny_generator):
    with pytest.raises(TrainingError, match="match no linear layer"):
        _lora_trainer(tmp_path, training_cache, tiny_generator, "train.lora.targets=['video:nothing.*']")
    # only adapters train: trainable=none is enough with LoRA, nothing without
    trainer = _lora_trainer(tmp_path, training_cache, tiny_generator, "train.trainable=none", name="none")
    assert all(lora.is_lora_parameter(n) for n, p in trainer.model.named_parameters() if p.requires_grad)
    with pytest.raises(TrainingError, match="leaves nothing to train"):
        _lora_trainer(tmp_path, training_cache, tiny_generator, "train.trainable=none", "train.lora.rank=0",
                      name="nothing")


# --------------------------------------------------------------------------------------------
# Adapter files: ours, diffusers', original Wan keys, plain peft
# --------------------------------------------------------------------------------------------

DIFFUSERS_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def _diffusers_with_lora(tmp_path):
    """A tiny diffusers Wan with a random LoRA added the diffusers way, saved as diffusers saves
    it (`WanPipeline.save_lora_weights`: peft keys under `transformer.`)."""
    diffusers = pytest.importorskip("diffusers")
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(0)
    reference = randomize_(diffusers.WanTransformer3DModel(rope_max_seq_len=64, **dict(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=32, ffn_dim=32, num_layers=2)).eval(), 0)
    reference.save_pretrained(tmp_path / "base")
    reference.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=DIFFUSERS_TARGETS))
    _randomize_adapters(reference, std=0.2)
    diffusers.WanPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(reference),
                                            transformer_lora_adapter_metadata=reference.peft_config["default"].to_dict())
    return reference


def test_a_diffusers_wan_lora_gives_diffusers_outputs(tmp_path):
    from backbone_helpers import random_inputs
    from univigu.models.convert import load_diffusers_wan

    reference = _diffusers_with_lora(tmp_path)
    files = list((tmp_path / "lora").glob("*.safetensors"))
    assert len(files) == 1 and all(k.startswith("transformer.") for k in load_file(str(files[0])))
    ours = load_diffusers_wan(tmp_path / "base").eval()
    name = lora.load_adapter(ours, tmp_path / "lora")
    assert len(lora.lora_layers(ours)) == 2 * 10  # per block: two attentions x 4, the FFN x 2
    video, t, cond = random_inputs(ours.config, batch=2, frames=3, height=4, width=6)
    with torch.no_grad():
        expected = reference(hidden_states=video, timestep=t, encoder_hidden_states=cond).sample
        reference.disable_adapters()
        without = reference(hidden_states=video, timestep=t, encoder_hidden_states=cond).sample
        got = ours(video, None, t, None, cond)[0]
    assert (expected - without).abs().max() > 1e-2  # the LoRA changes the output
    assert_close_ordered(got, expected, terms=network_terms(ours.config))
    # the same LoRA into a unified model grown from that base: its video and shared parts adapt
    from univigu.models.unify import unify_video_model

    unified = unify_video_model(load_diffusers_wan(tmp_path / "base"), vocab_size=11, text_length=4, init="copy",
                                seed=0).eval()
    lora.load_adapter(unified, tmp_path / "lora", name)
    assert {n for n, _ in lora.lora_layers(unified)} == {n for n, _ in lora.lora_layers(ours)}
    with torch.no_grad():
        assert_close_ordered(unified(video, None, t, None, cond)[0], expected, terms=network_terms(ours.config))


def test_original_key_lora_equals_the_diffusers_named_one(tmp_path):
    """DiffSynth-Studio / Wan tooling name LoRA modules by the original keys (`self_attn.q`); kohya
    writes lora_down / lora_up and alpha entries: the same adapter, the same outputs."""
    model = _unified()
    inputs = _inputs(model)
    config = lora.make_config(model, 4, 2, targets=["shared:attn1.*,attn2.*", "video:ffn.*"])
    lora.add_adapter(model, config)
    _randomize_adapters(model, std=0.2)
    lora.save_adapter(tmp_path / "ours", model)
    with torch.no_grad():
        expected = model(*inputs)
    from univigu.models.convert import to_original_keys

    saved = {k.removeprefix("base_model.model."): v
             for k, v in load_file(str(tmp_path / "ours" / lora.ADAPTER_WEIGHTS)).items()}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in saved})
    renamed = {m: to_original_keys({f"{m}.weight": torch.empty(0)}).popitem()[0][: -len(".weight")] for m in modules}
    assert renamed["blocks.0.attn1.to_q"] == "blocks.0.self_attn.q"
    diffsynth = {f"{renamed[m]}.{kind}.default.weight": saved[f"{m}.{kind}.weight"]
                 for m in modules for kind in ("lora_A", "lora_B")}
    kohya = {f"diffusion_model.{renamed[m]}.{new}.weight": saved[f"{m}.{old}.weight"]
             for m in modules for old, new in (("lora_A", "lora_down"), ("lora_B", "lora_up"))}
    kohya.update({f"diffusion_model.{renamed[m]}.alpha": torch.tensor(2.0) for m in modules})
    for name, state in (("diffsynth", diffsynth), ("kohya", kohya)):
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / f"{name}.safetensors"))
    for name in ("diffsynth", "kohya"):
        fresh = _unified()
        lora.load_adapter(fresh, tmp_path / f"{name}.safetensors", name)
        with torch.no_grad():
            got = fresh(*inputs)
        if name == "diffsynth":  # no alpha in the file: alpha = rank, twice the saved adapter's 2 / 4
            lora.set_adapters(fresh, [name], [0.5])
            with torch.no_grad():
                got = fresh(*inputs)
        for a, e in zip(got, expected):
            assert_close_ordered(a, e, terms=network_terms(model.config))


def test_saved_adapter_loads_into_a_fresh_base_with_ours_and_with_plain_peft(tmp_path):
    base_state = _unified().state_dict()
    model = _unified()
    inputs = _inputs(model)
    lora.add_adapter(model, lora.make_config(model, 4, 8, targets=[SHARED_ATTENTION, "text:text_ffn.*"]))
    _randomize_adapters(model)
    with torch.no_grad():
        expected = model(*inputs)
    lora.save_adapter(tmp_path / "adapter", model, base="the-base")

    fresh = _unified()
    fresh.load_state_dict(base_state)
    lora.load_adapter(fresh, tmp_path / "adapter", "mine")
    with torch.no_grad():
        _close(fresh(*inputs), expected, model.config)
        lora.fuse(fresh)
        _close(fresh(*inputs), expected, model.config)

    from peft import PeftModel

    plain = PeftModel.from_pretrained(_unified(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        _close(plain.base_model.model(*inputs), expected, model.config)
    assert json.loads((tmp_path / "adapter" / lora.ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "the-base"


def test_pipeline_loads_scales_fuses_and_unloads_a_lora(tmp_path):
    from pipeline_helpers import tiny_model_dir
    from univigu.pipeline import UniViGUPipeline

    directory = tiny_model_dir(tmp_path / "model")
    pipe = UniViGUPipeline.from_pretrained(directory)
    randomize_(pipe.transformer, 5)
    adapted = UniViGUTransformer(pipe.transformer.config)
    adapted.load_state_dict(pipe.transformer.state_dict())
    lora.add_adapter(adapted, lora.make_config(adapted, 2, targets=[SHARED_ATTENTION]))
    _randomize_adapters(adapted, std=0.3)
    lora.save_adapter(tmp_path / "adapter", adapted)
    c = pipe.transformer.config
    g = torch.Generator().manual_seed(0)
    video = torch.randn(1, c.in_channels, 1, 4, 4, generator=g)
    text = torch.randint(0, c.vocab_size, (1, c.text_length), generator=g)
    t, cond = torch.tensor([400.0]), torch.randn(1, 3, c.text_dim, generator=g)

    def run():
        with torch.no_grad():
            return pipe.transformer(video, text, t, t, cond)[0]

    base = run()
    name = pipe.load_lora_weights(tmp_path / "adapter", scale=0.5)
    assert pipe.get_list_adapters() == [name] and pipe.get_active_adapters() == [name]
    half = run()
    pipe.set_adapters(name, 1.0)
    full = run()
    with torch.no_grad():
        expected = adapted(video, text, t, t, cond)[0]
    assert_close_ordered(full, expected, terms=network_terms(c))
    lora.set_adapters(adapted, ["default"], [0.5])  # the weight update at half its size
    with torch.no_grad():
        assert_close_ordered(half, adapted(video, text, t, t, cond)[0], terms=network_terms(c))
    assert (half - full).abs().max() > 1e-3 and (half - base).abs().max() > 1e-3
    pipe.fuse_lora()
    assert_close_ordered(run(), full, terms=network_terms(c))
    pipe.unfuse_lora()
    pipe.save_pretrained(tmp_path / "merged")  # written merged, plain keys
    merged = UniViGUPipeline.from_pretrained(tmp_path / "merged").transformer
    with torch.no_grad():
        assert_close_ordered(merged(video, text, t, t, cond)[0], full, terms=network_terms(c))
    pipe.unload_lora_weights()  # fused and unfused once: the base weights to rounding
    assert not pipe.get_list_adapters()
    assert_close_ordered(run(), base, terms=network_terms(c))


def test_resume_with_lora_is_exact(tmp_path, training_cache, tiny_generator):
    common = ("train.steps=4", "train.save_every=2", "train.warmup_steps=2", "train.lora.dropout=0.1")
    Trainer(tiny_config(tmp_path / "full", training_cache, *LORA_RUN, *common, stage="knowledge_recall",
                        init_from=tiny_generator), progress=False).run()

    class Stop(Exception):
        pass

    def stop_at_3(trainer, logs):
        if trainer.step == 3:
            raise Stop

    with pytest.raises(Stop):
        _lora_trainer(tmp_path, training_cache, tiny_generator, *common, name="part").run(on_step=stop_at_3)
    resumed = _lora_trainer(tmp_path, training_cache, tiny_generator, *common, name="part")
    assert resumed.step == 2
    resumed.run()
    a, b = (tmp_path / name / "checkpoints" / "ckpt-00000004" for name in ("full", "part"))
    for which in ("model", "ema"):
        wa, wb = ckpt.read_weights(a, which), ckpt.read_weights(b, which)
        assert any(".lora_B." in k for k in wa)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), which
    oa, ob = (torch.load(p / "optimizer.pt", weights_only=True)["state"] for p in (a, b))
    assert oa.keys() == ob.keys() and any(".lora_A." in k for k in oa)
    assert all(torch.equal(oa[n][k], ob[n][k]) for n in oa for k in ("exp_avg", "exp_avg_sq"))
    for name in ("full", "part"):
        assert (tmp_path / name / "adapter" / lora.ADAPTER_WEIGHTS).is_file()
    wa, wb = (load_file(str(tmp_path / n / "adapter" / lora.ADAPTER_WEIGHTS)) for n in ("full", "part"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_lora_flag_and_convert_merge_lora(tmp_path, capsys):
    import numpy as np

    from pipeline_helpers import prompt_encoder, tiny_model_dir
    from univigu.cli import main
    from univigu.data.video_io import write_video
    from univigu.pipeline import UniViGUPipeline

    directory = tiny_model_dir(tmp_path / "model")
    base = UniViGUPipeline.from_pretrained(directory, dtype="fp32").transformer
    adapted = UniViGUTransformer(base.config)
    adapted.load_state_dict(base.state_dict())
    lora.add_adapter(adapted, lora.make_config(adapted, 2, targets=[SHARED_ATTENTION, "text:text_ffn.*"]))
    _randomize_adapters(adapted, std=0.5)
    lora.save_adapter(tmp_path / "adapter", adapted)

    clip = tmp_path / "clip.mp4"
    write_video(clip, np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    pipe = UniViGUPipeline.from_pretrained(directory, dtype="fp32", prompt_encoder=prompt_encoder())
    pipe.load_lora_weights(tmp_path / "adapter", scale=0.7)
    expected = pipe.caption([clip], steps=3, sampler="euler", seed=7).captions
    code = main(["caption", str(clip), "--ckpt_dir", str(directory), "--sample_steps", "3", "--text_sampler",
                 "euler", "--base_seed", "7", "--dtype", "fp32", "--lora", f"{tmp_path / 'adapter'}:0.7"])
    out, _ = capsys.readouterr()
    assert code == 0 and out.splitlines() == expected

    code = main(["convert", "--model_dir", str(directory), "--merge_lora", f"{tmp_path / 'adapter'}:0.7",
                 "--out", str(tmp_path / "merged")])
    capsys.readouterr()
    assert code == 0
    merged = load_bundle(tmp_path / "merged").transformer
    pipe.fuse_lora()
    fused = {k.replace(".base_layer.", "."): v for k, v in pipe.transformer.state_dict().items()
             if not lora.is_lora_parameter(k)}
    assert set(merged.state_dict()) == set(fused)
    assert all(torch.equal(v, fused[k]) for k, v in merged.state_dict().items())

    code = main(["caption", str(clip), "--ckpt_dir", str(directory), "--lora", str(tmp_path / "missing")])
    _, err = capsys.readouterr()
    assert code != 0 and len(err.strip().splitlines()) == 1 and "--lora" in err


def test_the_lora_preset_is_the_unified_preset_plus_adapters_on_the_shared_attention():
    from univigu.config import load_config, to_dict

    unified, preset = to_dict(load_config("shapesworld-unified")), to_dict(load_config("shapesworld-unified-lora"))
    lora_cfg = preset["train"].pop("lora")
    assert lora_cfg["rank"] > 0 and all(t.startswith("shared:") for t in lora_cfg["targets"])
    unified["train"].pop("lora")
    differ = {k for k in unified["train"] if unified["train"][k] != preset["train"][k]}
    assert differ == {"stage", "output_dir", "steps"} and preset["train"]["stage"] == "capability_refinement"
    assert {k: v for k, v in preset.items() if k != "train"} == {k: v for k, v in unified.items() if k != "train"}
    model = UniViGUTransformer(load_config("shapesworld-unified-lora").model, vocab_size=10)
    names = lora.target_modules(model, lora_cfg["targets"])
    assert len(names) == 8 * model.config.num_layers
