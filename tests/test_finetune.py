"""Fine-tuning: LoRA on every layer kind, frozen base, merge/reload parity, padded chat batches,
adapters the HF/PEFT world loads, exact resume, and one-line errors."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mamba_slm import HybridLM, ModelConfig
from mamba_slm.chat import is_chat_model
from mamba_slm.chat_data import render_chat
from mamba_slm.cli import main
from mamba_slm.finetune import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterTrainer,
    FinetuneArgs,
    FinetuneError,
    adapter_meta,
    apply_lora,
    load_model_with_adapter,
    run_finetune,
    save_adapter,
)
from mamba_slm.generation import GenerationConfig, load_engine
from mamba_slm.hf import MambaSLMForCausalLM
from mamba_slm.speculative import NGRAMS_NAME, CorpusNgrams
from mamba_slm.tokenizer import train_tokenizer
from mamba_slm.train import TrainArgs, collate_examples

COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
THINGS = ["sky", "grass", "sun", "snow", "night", "cloud", "apple", "sea"]


def conversation(i: int) -> list[dict]:
    """Distinct openings (held-out ones are unseen), answers that follow from the question."""
    thing, color = THINGS[i % 8], COLORS[(i // 8 + i) % 8]
    msgs = [{"role": "user", "content": f"The {thing} is {color}. Right?"},
            {"role": "assistant", "content": f"Yes, the {thing} is {color}."}]  # fmt: skip
    if i % 5 == 0:  # some multi-turn conversations
        msgs += [
            {"role": "user", "content": "Are you sure?"},
            {"role": "assistant", "content": f"Yes, {color}."},
        ]
    return msgs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer, a tiny base model directory (Mamba, attention, MLP) and a JSONL conversation file."""
    root = tmp_path_factory.mktemp("ft")
    convs = [conversation(i) for i in range(60)]
    (root / "chat.jsonl").write_text("\n".join(json.dumps({"messages": c}) for c in convs) + "\n")
    tok = train_tokenizer(
        [m["content"] for c in convs for m in c] * 3, vocab_size=300, output_dir=root / "base"
    )
    torch.manual_seed(0)
    # Embeddings larger than the 0.02 init, as a trained model's are: with the tied embeddings and the
    # final norm frozen, 0.02 would cap every logit near 1 and no adapter could predict confidently.
    config = ModelConfig.from_preset(
        "tiny",
        vocab_size=len(tok),
        layer_pattern="MAM",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.1,
    )
    HybridLM(config).save_pretrained(root / "base")
    return root, tok


def targs(out, **kw) -> TrainArgs:
    base = dict(output_dir=str(out), max_steps=12, batch_size=8, learning_rate=1e-2, warmup_steps=2, eval_steps=0,
                save_steps=0, logging_steps=4, weight_decay=0.0, show_progress=False)  # fmt: skip
    return TrainArgs(**{**base, **kw})


def ft_args(root, out, **kw) -> FinetuneArgs:
    values = dict(
        base=str(root / "base"), dataset=str(root / "chat.jsonl"), chat=True, use_lora=True, lora_r=4
    )
    train = kw.pop("train", None) or targs(out)
    return FinetuneArgs(train=train, **{**values, **kw})


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """One LoRA chat SFT run with --merge, shared by the parity tests."""
    root, _ = setup
    out = tmp_path_factory.mktemp("run") / "lora"
    summary = run_finetune(ft_args(root, out, merge=True, lora_dropout=0.0, train=targs(out, max_steps=30)))
    return out, summary


def test_default_targets_cover_mamba_attention_and_mlp_and_are_never_bypassed(setup):
    root, _ = setup
    for mixer in ("mamba2", "mamba1"):
        core = HybridLM(ModelConfig.from_preset("tiny", layer_pattern="MAM", mixer=mixer))
        apply_lora(core, r=2)
        wrapped = sorted(n for n, m in core.named_modules() if hasattr(m, "lora_A"))
        want = sorted([f"layers.{i}.mixer.{p}" for i in (0, 2) for p in ("in_proj", "out_proj")]
                      + [f"layers.1.mixer.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
                      + [f"layers.{i}.mlp.{p}" for i in range(3) for p in ("gate_proj", "up_proj", "down_proj")])  # fmt: skip
        assert wrapped == want, mixer
        called: set[str] = set()
        for name in wrapped:  # every adapter runs in the parallel forward and in the recurrent step
            core.get_submodule(name).lora_A.default.register_forward_hook(
                lambda *a, n=name, c=called: c.add(n)
            )
        ids = torch.randint(0, 256, (1, 6))
        core(ids, labels=ids, return_logits=False).loss.backward()  # the training path
        assert called == set(wrapped)
        called.clear()
        with torch.no_grad():
            cache = core.allocate_cache(1)
            core(ids, cache=cache)
            called.clear()
            core(ids[:, :1], cache=cache)
        assert called == set(wrapped), mixer


def test_only_the_adapter_trains_and_the_base_stays_bit_identical(setup, tmp_path):
    root, tok = setup
    from mamba_slm.checkpoint import load_model

    base = load_model(root / "base")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = apply_lora(base, r=4, dropout=0.0)
    lora_before = {n: p.clone() for n, p in base.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)
    examples = [render_chat(tok, conversation(i)) for i in range(16)]
    trainer = AdapterTrainer(peft_model, adapter_meta(base, str(root / "base")), base, examples, [],
                             targs(tmp_path, max_steps=2), tok.pad_token_id, tok)  # fmt: skip
    trainer.train()
    changed = [
        n for n, p in base.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])
    ]
    assert any("lora_B" in n for n in changed)
    peft_model.unload()  # drop the adapter without merging: the base weights as they are now
    after = base.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_chat_sft_learns_and_writes_a_peft_adapter(setup, trained):
    _, tok = setup
    out, s = trained
    assert s["val_loss_after"] < 0.7 * s["val_loss_before"]
    assert 0 < s["trainable_fraction"] < 0.2
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "training_log.jsonl", "finetune_summary.json"):  # fmt: skip
        assert (out / name).exists(), name
    assert not (out / "model.safetensors").exists()  # the adapter only, not a copy of the base
    recorded = json.loads((out / "training_args.json").read_text())
    assert recorded["chat"] is True and recorded["use_lora"] is True and recorded["max_steps"] == 30
    generation = json.loads((out / "merged" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [
        tok.eos_token_id,
        tok.convert_tokens_to_ids("<|end|>"),
    ]  # stops a turn


def test_merged_model_and_reloaded_adapter_give_the_same_logits(setup, trained):
    root, tok = setup
    out, _ = trained
    ids = torch.tensor([render_chat(tok, conversation(3))[0]])
    # base + adapter, unmerged, through PEFT on the HF wrapper as the HF ecosystem loads it
    wrapper = AutoModelForCausalLM.from_pretrained(root / "base")
    peft_model = PeftModel.from_pretrained(wrapper, out).eval()
    with torch.no_grad():
        reference = peft_model(input_ids=ids).logits
        ours = load_model_with_adapter(root / "base", out).eval()(ids).logits  # merged in memory
        from_adapter_dir = load_model_with_adapter(out).eval()(ids).logits  # base found from adapter_config
        merged_dir = HybridLM.from_pretrained(out / "merged").eval()(ids).logits  # --merge output
        base = HybridLM.from_pretrained(root / "base").eval()(ids).logits
    assert not torch.allclose(reference, base, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(from_adapter_dir, ours, atol=0, rtol=0)
    torch.testing.assert_close(merged_dir, ours, atol=0, rtol=0)
    # an adapter saved again from the PEFT model reloads to the same logits
    save_adapter(peft_model, out.parent / "again", json.loads((out / "mamba_slm_adapter.json").read_text()))
    with torch.no_grad():
        again = PeftModel.from_pretrained(MambaSLMForCausalLM.from_core(HybridLM.from_pretrained(root / "base")),
                                          out.parent / "again").eval()(input_ids=ids).logits  # fmt: skip
    torch.testing.assert_close(again, reference, atol=0, rtol=0)


def test_trained_embeddings_stay_tied_and_travel_in_the_adapter(setup, tmp_path):
    root, tok = setup
    s = run_finetune(
        ft_args(root, tmp_path, train_embeddings=True, lora_dropout=0.0, train=targs(tmp_path, max_steps=6))
    )
    base = HybridLM.from_pretrained(root / "base").eval()
    vocab_rows = base.embed_tokens.weight.numel()
    assert (
        s["trainable_parameters"] > vocab_rows
    )  # the embeddings, once (tied to lm_head), and the LoRA weights
    assert s["total_parameters"] == base.num_parameters() + s["trainable_parameters"] - vocab_rows
    merged = load_model_with_adapter(root / "base", tmp_path).eval()
    assert merged.lm_head.weight is merged.embed_tokens.weight
    assert not torch.equal(merged.embed_tokens.weight, base.embed_tokens.weight)
    ids = torch.tensor([render_chat(tok, conversation(7))[0]])
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(root / "base"), tmp_path
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(input_ids=ids).logits, atol=2e-5, rtol=1e-5)


def test_a_padded_batch_row_equals_the_conversation_alone(setup):
    root, tok = setup
    model = HybridLM.from_pretrained(root / "base").eval()
    apply_lora(model, r=4, dropout=0.0)
    for p in model.parameters():  # a non-zero adapter, so its layers matter too
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    examples = [render_chat(tok, conversation(i)) for i in (0, 1, 2)]  # lengths differ: 0 is multi-turn
    ids, mask, labels = collate_examples(examples, tok.pad_token_id)
    assert len({len(e[0]) for e in examples}) > 1 and (labels[mask == 0] == -100).all()
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for row, (example_ids, _) in enumerate(examples):
            alone = model(torch.tensor([example_ids])).logits[0]
            torch.testing.assert_close(batch[row, : len(example_ids)], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("embeddings", [False, True])
def test_resume_continues_the_adapter_exactly(setup, tmp_path, embeddings):
    root, _ = setup
    run = lambda name, **kw: run_finetune(ft_args(root, tmp_path / name, train_embeddings=embeddings,  # noqa: E731
                                                  train=targs(tmp_path / name, max_steps=6, save_steps=3, **kw)))  # fmt: skip
    full = run("full")
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = run("resumed", resume=True)
    assert resumed["step"] == full["step"] == 6
    a = (tmp_path / "full" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "resumed" / "adapter_model.safetensors").read_bytes()


def test_full_finetuning_on_text_writes_a_model_directory(setup, tmp_path):
    root, _ = setup
    text = tmp_path / "notes.txt"  # plain text: packed blocks, every token a target
    text.write_text("\n\n".join(f"The {t} is {c}, and the {t} stays {c}." for t in THINGS for c in COLORS))
    train = targs(tmp_path / "out", max_steps=4, learning_rate=1e-3)
    s = run_finetune(
        ft_args(root, tmp_path, use_lora=False, chat=False, dataset=str(text), max_length=32, train=train)
    )
    assert s["trainable_fraction"] == 1.0 and s["val_loss_after"] < s["val_loss_before"]
    tmp_path = tmp_path / "out"
    tuned = HybridLM.from_pretrained(tmp_path)
    base = HybridLM.from_pretrained(root / "base")
    assert not torch.equal(tuned.layers[0].mixer.in_proj.weight, base.layers[0].mixer.in_proj.weight)


@pytest.mark.parametrize("lora", [False, True])
def test_checkpoints_of_a_chat_finetune_generate_as_chat_models(setup, tmp_path, lora):
    root, tok = setup
    out = tmp_path / "run"
    run_finetune(ft_args(root, out, use_lora=lora, train=targs(out, max_steps=4, save_steps=2)))
    end = tok.convert_tokens_to_ids("<|end|>")
    for model_dir in (out, out / "checkpoint-4"):
        assert is_chat_model(model_dir), model_dir
        assert (model_dir / "tokenizer_config.json").exists()
        engine = load_engine(str(model_dir))
        assert end in engine.default_config().stop_ids
        if not lora:  # a full model directory: transformers' generate stops at the end of a turn too
            eos = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
            assert end in eos and tok.eos_token_id in eos


def test_an_adapter_for_another_base_is_rejected(setup, trained, tmp_path):
    root, _ = setup
    out, _ = trained
    torch.manual_seed(1)  # same shape, other weights
    HybridLM(HybridLM.from_pretrained(root / "base").config).save_pretrained(tmp_path / "other")
    with pytest.raises(FinetuneError, match="trained on another base model"):
        load_model_with_adapter(tmp_path / "other", out)
    bigger = ModelConfig.from_preset("tiny", vocab_size=300, layer_pattern="MAMM")
    HybridLM(bigger).save_pretrained(tmp_path / "bigger")
    with pytest.raises(FinetuneError, match="belongs to another base model.*layer_pattern"):
        load_model_with_adapter(tmp_path / "bigger", out)
    # without our metadata, PEFT's own checks still give one line
    shutil.copytree(
        out, tmp_path / "bare", ignore=shutil.ignore_patterns("checkpoint-*", "merged", "mamba_slm_*")
    )
    wider = ModelConfig.from_preset(
        "tiny", vocab_size=300, layer_pattern="MAM", d_model=96, head_dim=16, n_heads=4
    )
    HybridLM(wider).save_pretrained(tmp_path / "wider")
    with pytest.raises(FinetuneError, match="does not fit the base model") as e:
        load_model_with_adapter(tmp_path / "wider", tmp_path / "bare")
    assert "\n" not in str(e.value)
    with pytest.raises(FinetuneError, match="not an adapter directory"):
        load_model_with_adapter(root / "base", tmp_path)


def test_qlora_puts_lora_on_4bit_projections_and_trains(setup, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")  # the `gpu` extra; bitsandbytes >= 0.49 also trains on a CPU
    root, tok = setup
    from mamba_slm.checkpoint import load_model
    from mamba_slm.finetune import quantize_4bit

    base = load_model(root / "base")
    meta = adapter_meta(base, str(root / "base"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peft_model = apply_lora(quantize_4bit(base, torch.float32, device), r=4, dropout=0.0)
    assert isinstance(base.layers[0].mixer.in_proj.base_layer, bnb.nn.Linear4bit)
    assert not isinstance(base.lm_head, bnb.nn.Linear4bit)
    examples = [render_chat(tok, conversation(i)) for i in range(16)]
    trainer = AdapterTrainer(
        peft_model, meta, base, examples, [], targs(tmp_path, max_steps=8), tok.pad_token_id, tok
    )
    losses = [e["loss"] for e in trainer.train()["log"] if "loss" in e]
    assert losses[-1] < losses[0]
    merged = load_model_with_adapter(root / "base", tmp_path)  # merged into the full-precision base
    assert isinstance(merged.layers[0].mixer.in_proj, torch.nn.Linear)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--use-lora", "--lora-r", "0"], "--lora-r: expected a positive integer, got 0"),
        (["--use-lora", "--target-modules", "in_proj,qkv"], "--target-modules: unknown module 'qkv'"),
        (["--use-lora", "--target-modules", "conv1d"], "conv1d cannot take LoRA"),
        (["--merge"], "--merge: only with --use-lora"),
        (["--train-embeddings"], "--train-embeddings: only with --use-lora"),
        (["--dataset", "NOASSISTANT"], "has no assistant turn"),
        (["--dataset-config", "wikitext-2-raw-v1"], "are for text data, not --chat"),
        (["--lookup-tokens", "-1"], "--lookup-tokens: expected 0"),
        pytest.param(
            ["--qlora"],
            "--qlora: 4-bit NF4 quantization (bitsandbytes) needs a CUDA GPU",
            marks=pytest.mark.skipif(
                torch.cuda.is_available(), reason="the error is for machines without CUDA"
            ),
        ),
    ],
)
def test_cli_errors_are_one_line(setup, tmp_path, capsys, extra, message):
    root, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"messages": conversation(1)}) + "\n" + json.dumps({"messages": conversation(2)[:1]})
    )
    extra = [str(bad) if e == "NOASSISTANT" else e for e in extra]
    argv = ["finetune", "--base", str(root / "base"), "--output-dir", str(tmp_path / "o"), "--chat",
            "--dataset", str(root / "chat.jsonl"), "--max-steps", "1", *extra]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mamba-slm: error: ") and message in err and err.count("\n") == 1, err


def test_cli_finetune_and_merge(setup, tmp_path, capsys):
    root, _ = setup
    argv = ["finetune", "--base", str(root / "base"), "--output-dir", str(tmp_path), "--chat", "--dataset",
            str(root / "chat.jsonl"), "--use-lora", "--lora-r", "4", "--max-steps", "3", "--merge"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "trainable params: " in printed and "trainable%: " in printed and "held-out loss" in printed
    assert HybridLM.from_pretrained(tmp_path / "merged").config.layer_pattern == "MAM"
    # Prompt lookup's table, of the tuned model's predictions on its conversations, beside each result;
    # the base has none, and the engine of base + adapter drafts from the adapter's.
    assert (tmp_path / NGRAMS_NAME).exists() and (tmp_path / "merged" / NGRAMS_NAME).exists()
    assert "prompt-lookup n-gram table" in printed and not (root / "base" / NGRAMS_NAME).exists()
    engine = load_engine(str(root / "base"), adapter=str(tmp_path))
    assert len(engine.ngrams) > 0
    assert (
        engine.ngrams.next_token
        == CorpusNgrams.load(tmp_path / NGRAMS_NAME, len(engine.tokenizer)).next_token
    )
    argv = [*argv[:4], str(tmp_path / "no-table"), *argv[5:-1], "--lookup-tokens", "0"]
    assert main(argv) == 0
    assert (tmp_path / "no-table" / ADAPTER_WEIGHTS).exists() and not (
        tmp_path / "no-table" / NGRAMS_NAME
    ).exists()


def test_loading_lora_support_prints_nothing():
    """Importing our fine-tuning module and peft (which pulls in bitsandbytes when installed) leaves
    stderr empty: no third-party notices on every adapter load."""
    code = "import mamba_slm.finetune, peft, peft.tuners.lora"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_an_adapter_directory_alone_loads_for_generation(setup, trained, tmp_path):
    """`generate --model <fine-tune output>` works: the adapter's recorded base is loaded and merged,
    and the tokenizer comes from the adapter directory, or from the base when it has none."""
    root, _ = setup
    out, _ = trained
    config = GenerationConfig(max_new_tokens=6, temperature=0)
    want = load_engine(str(root / "base"), str(out)).generate(["Hello there"], config)[0].tokens
    assert want != load_engine(str(root / "base")).generate(["Hello there"], config)[0].tokens
    assert load_engine(str(out)).generate(["Hello there"], config)[0].tokens == want
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "mamba_slm_adapter.json"):
        shutil.copy(out / name, bare / name)
    assert load_engine(str(bare)).generate(["Hello there"], config)[0].tokens == want
