"""Encoder families, the frozen-bottom / trainable-top split, LoRA, EWC sizing and export.

Every model here is a tiny random-weight model built from a transformers
config and saved to a tmp folder (no downloads): a BERT encoder with a
WordPiece vocab, and Qwen2 / Llama decoders with a byte-level tokenizer.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from learners.towers.adapters import load_trainable_state_dict, trainable_parameters, trainable_state_dict
from learners.encoder import TextEncoder, last_token_pool
from learners.encoder.layers import encoder_layers
from learners.errors import ConfigError
from learners.checkpoint.export import export_model, load_exported
from learners.learner import ContinualRecommender, LearnerConfig
from learners.synthetic import SyntheticWorld

CPU = torch.device("cpu")
TEXTS = ["The Quiet River 7 (1987) | horror", "a", "Golden Kingdom 12 (1999) | science fiction",
         "Lost Song (1970) | musical", "war drama"]
_WORDS = sorted(set(("the quiet epic dark joyful strange tender brutal witty lost golden river city star garden "
                     "machine winter kingdom detective song island science fiction romantic comedy crime thriller "
                     "animated family war drama horror documentary fantasy adventure western musical a short "
                     "probe somewhat longer text for split check of encoder passage").split()))


# -- tiny models --------------------------------------------------------------------------------------

def build_bert(folder: Path, layers: int = 3) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *"0123456789()|:"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


def build_decoder(folder: Path, arch: str = "qwen2", layers: int = 3) -> Path:
    """A causal LM folder (``*ForCausalLM``) with a character-level byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                              Qwen2ForCausalLM)

    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<pad>", *chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                            eos_token="<|endoftext|>").save_pretrained(folder)
    torch.manual_seed(0)
    kwargs = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128, pad_token_id=1,
                  eos_token_id=0, bos_token_id=0, tie_word_embeddings=True)
    if arch == "qwen2":
        Qwen2ForCausalLM(Qwen2Config(**kwargs)).save_pretrained(folder)
    else:
        LlamaForCausalLM(LlamaConfig(**kwargs)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {"bert": build_bert(root / "bert"), "qwen2": build_decoder(root / "qwen2", "qwen2"),
            "llama": build_decoder(root / "llama", "llama")}


def encoder(path: Path, train_layers: int = 1, train_params: str = "top", **kwargs) -> TextEncoder:
    kwargs.setdefault("cache_dtype", torch.float32)
    return TextEncoder(str(path), train_layers, 24, CPU, train_params=train_params, **kwargs)


# -- families -----------------------------------------------------------------------------------------

def test_family_from_the_model_folder(models):
    bert = encoder(models["bert"], 0)
    assert (bert.family, bert.pooling, bert.tokenizer.padding_side) == ("encoder", "mean", "right")
    for name in ("qwen2", "llama"):
        dec = encoder(models[name], 0)
        assert (dec.family, dec.pooling, dec.tokenizer.padding_side) == ("decoder", "last_token", "left")
        assert dec.lora_targets == ("q_proj", "v_proj")
    assert bert.lora_targets == ("query", "value")
    assert bert.cache_dtype == torch.float32  # as asked; the folder default is float16
    assert TextEncoder(str(models["bert"]), 1, 24, CPU).cache_dtype == torch.float16
    assert TextEncoder(str(models["qwen2"]), 1, 24, CPU).cache_dtype == torch.bfloat16


def test_document_prompt_and_eos_from_the_folder(models, tmp_path):
    import shutil

    folder = tmp_path / "qwen-prompted"
    shutil.copytree(models["qwen2"], folder)
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "Q: ", "document": "D: "}}))
    enc = encoder(folder, 0)
    assert enc.spec.document_prompt == "D: "
    (folder / "recstream.json").write_text(json.dumps({"document_prompt": "passage: ", "append_eos": True}))
    enc = encoder(folder, 1)
    assert enc.spec.document_prompt == "passage: " and enc.spec.append_eos
    batch = enc.tokenize(["x" * 100, "ab"])
    eos = enc.tokenizer.eos_token_id
    assert batch["input_ids"].shape[1] == 24  # truncated to max_tokens, EOS included
    assert batch["input_ids"][:, -1].tolist() == [eos, eos]  # left padding: last column is each row's EOS
    assert enc.tokenizer.decode(batch["input_ids"][1][batch["attention_mask"][1].bool()]).startswith("passage: ab")
    assert enc.check_split() < 1e-5


def test_bert_with_recstream_json_cls_pooling(models, tmp_path):
    import shutil

    folder = tmp_path / "bert-cls"
    shutil.copytree(models["bert"], folder)
    (folder / "recstream.json").write_text(json.dumps({"pooling": "cls"}))
    enc = encoder(folder, 2)
    assert enc.pooling == "cls" and enc.top.pooling == "cls"
    assert enc.check_split() < 1e-5


# -- the split ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "qwen2", "llama"])
@pytest.mark.parametrize("train_params,train_layers", [("top", 1), ("top", 2), ("lora", 2), ("full", 0)])
def test_cached_bottom_plus_top_reproduces_the_model(models, name, train_params, train_layers):
    enc = encoder(models[name], train_layers, train_params)
    if train_params == "full":
        assert enc.train_layers == enc.num_layers() and enc.bottom_layers == 0
    whole = enc.pooled(TEXTS)
    enc.top.eval()
    with torch.no_grad():
        split = enc.top(enc.frozen_features(TEXTS), CPU).numpy()
    np.testing.assert_allclose(split, whole, atol=1e-5, rtol=0)
    # Padding in the top depends on the batch: one text at a time gives the same.
    with torch.no_grad():
        alone = np.stack([enc.top(enc.frozen_features([t]), CPU)[0].numpy() for t in TEXTS])
    np.testing.assert_allclose(alone, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["bert", "qwen2"])
def test_default_cache_dtype_is_close(models, name):
    enc = TextEncoder(str(models[name]), 1, 24, CPU)
    enc.top.eval()
    with torch.no_grad():
        split = enc.top(enc.frozen_features(TEXTS), CPU).numpy()
    whole = enc.pooled(TEXTS)
    assert np.abs(split - whole).max() < 2e-2 * np.abs(whole).max()


@pytest.mark.parametrize("name", ["qwen2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_pooling_picks_the_last_real_token(models, name, side):
    enc = encoder(models[name], 1)
    enc.tokenizer.padding_side = side
    batch = enc.tokenize(TEXTS)
    mask = batch["attention_mask"]
    assert bool((mask == 0).any())  # really padded
    if side == "left":
        assert bool((mask[:, -1] == 1).all())
    pooled = enc.pooled(TEXTS)
    for i, text in enumerate(TEXTS):
        ids = enc.tokenizer(text, truncation=True, max_length=24, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            alone = enc.model(input_ids=ids).last_hidden_state[0, -1].numpy()  # no padding at all
        np.testing.assert_allclose(pooled[i], alone, atol=1e-5, rtol=0)
    # and the cached-bottom + top path agrees with it
    np.testing.assert_allclose(enc.top_pooled(TEXTS), pooled, atol=1e-5, rtol=0)


def test_last_token_pool_under_both_paddings():
    states = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_pool(states, right).flatten().tolist() == [1.0, 7.0]
    assert last_token_pool(states, left).flatten().tolist() == [3.0, 7.0]


# -- what trains ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "qwen2"])
def test_lora_trains_only_adapters_and_shares_frozen_weights(models, name):
    enc = encoder(models[name], 2, "lora", lora_rank=4)
    names = [n for n, p in enc.top.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    per_layer = 2 * 4 * (32 + 32) if name == "bert" else 4 * (32 + 32) + 4 * (32 + 16)  # v_proj: 2 kv heads of 8
    assert trainable_parameters(enc.top) == 2 * per_layer
    # the base model stays as shipped (no adapters in it) ...
    assert not any("lora" in n for n, _ in enc.model.named_parameters())
    # ... and copies of the top (one per learner) share its frozen weights
    twin = copy.deepcopy(enc.top)
    frozen = {id(p) for p in enc.model.parameters()}
    assert all(id(p) in frozen for p in twin.parameters() if not p.requires_grad)
    assert all(id(p) not in frozen for p in twin.parameters() if p.requires_grad)
    state = trainable_state_dict(twin)
    assert sorted(state) == sorted(names)
    # its state dict (what a checkpoint of the learner holds) is the adapters only, and loads strictly
    assert sorted(twin.state_dict()) == sorted(names)
    twin.load_state_dict({k: v * 0 for k, v in twin.state_dict().items()}, strict=True)
    assert all(float(p.abs().sum()) == 0 for p in twin.parameters() if p.requires_grad)
    assert all(float(p.abs().sum()) > 0 for n, p in twin.named_parameters() if n.endswith("q_proj.base_layer.weight")
               or n.endswith("query.base_layer.weight"))
    load_trainable_state_dict(enc.top, {k: v + 1 for k, v in state.items()})
    with pytest.raises(ConfigError):
        load_trainable_state_dict(enc.top, {})


def test_top_and_full_train_layers_and_final_norm(models):
    dec = encoder(models["qwen2"], 1, "top")
    names = {n for n, p in dec.top.named_parameters() if p.requires_grad}
    assert any(n.startswith("norm.") for n in names) and all(n.startswith(("layers.0.", "norm.")) for n in names)
    full = encoder(models["qwen2"], 1, "full")
    assert len(full.top.layers) == 3
    assert trainable_parameters(full.top) == sum(p.numel() for n, p in full.model.named_parameters()
                                                 if not n.startswith("embed_tokens"))


def test_gradient_checkpointing_gives_the_same_gradients(models):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # same LoRA initialisation both times
        enc = encoder(models["qwen2"], 2, "lora", gradient_checkpointing=checkpointing)
        top = copy.deepcopy(enc.top).train()
        torch.manual_seed(1)
        top(enc.frozen_features(TEXTS), CPU).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in top.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


def test_bad_lora_targets_are_a_config_error(models):
    with pytest.raises(ConfigError):
        encoder(models["bert"], 1, "lora", lora_targets=["no_such_module"])
    with pytest.raises(ConfigError):
        encoder(models["bert"], 1, "everything")


# -- the learner path ------------------------------------------------------------------------------------

def _learner(path: Path, train_params: str, train_layers: int = 2) -> ContinualRecommender:
    config = LearnerConfig(model_path=str(path), device="cpu", train_layers=train_layers, train_params=train_params,
                           max_text_tokens=24, vector_dim=16, history_length=8, batch_size=32, negatives=16,
                           replay_size=200, replay_batch=8, lora_rank=4, seed=0)
    # An fp32 cache makes the learner's text vectors exactly the exported model's.
    enc = TextEncoder.from_config(config, CPU)
    enc.cache_dtype = torch.float32
    return ContinualRecommender(config, enc)


def _run(learner: ContinualRecommender, world: SyntheticWorld, n_events: int = 210) -> list:
    learner.add_items(world.items())
    reports = []
    for i, event in enumerate(world.events(n_events)):
        learner.observe(event)
        if (i + 1) % 70 == 0:
            reports.append(learner.learn())
    return reports


@pytest.mark.parametrize("name", ["bert", "qwen2"])
@pytest.mark.parametrize("train_params", ["lora", "top"])
def test_learner_trains_and_exports(models, name, train_params, tmp_path):
    world = SyntheticWorld(n_items=60, n_users=30, drift_every=10)
    learner = _learner(models[name], train_params)
    before = {n: p.detach().clone() for n, p in learner.top.named_parameters()}
    reports = _run(learner, world)
    assert len(reports) == 3 and all(np.isfinite(r.loss) for r in reports) and reports[-1].ewc_penalty > 0

    items = learner.item_vectors()
    users = learner.user_vectors([f"user-{u}" for u in range(30)])
    for table in (items, users):
        assert np.isfinite(table).all()
        np.testing.assert_allclose(np.linalg.norm(table, axis=1), 1.0, atol=1e-5)

    # Only what should train moved.
    moved = {n for n, p in learner.top.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in learner.top.named_parameters() if p.requires_grad}
    assert moved and moved <= trainable
    if train_params == "lora":
        assert all(".lora_" in n for n in trainable)
        assert not any(p.requires_grad for p in learner.encoder.model.parameters())

    # EWC state, optimizer, the module's state dict and trainable parameters are the same set.
    trainable_names = {n for n, p in learner.model.named_parameters() if p.requires_grad}
    assert {k for k in learner.model.state_dict() if k.startswith("top.")} == \
        {n for n in trainable_names if n.startswith("top.")}
    ewc = learner.parts.ewc
    n_trainable = trainable_parameters(learner.model)
    assert ewc.state_bytes() == 2 * n_trainable * 4
    assert set(ewc.importance) == {n for n, p in learner.model.named_parameters() if p.requires_grad}
    optimised = {id(p) for g in learner.parts.strategy.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in learner.model.parameters() if p.requires_grad}

    # Export round trip: the exported model's pooled vectors are the learner's text vectors.
    texts = [item.text for item in world.items()[:8]]
    mine = learner.encoder.top_pooled(texts, learner.top)
    assert np.abs(mine - learner.encoder.pooled(texts)).max() > 1e-4  # training changed the encoder
    rows = learner.catalogue.rows([item.item_id for item in world.items()[:8]])
    np.testing.assert_allclose(learner.features.pooled[rows].numpy(), mine, atol=1e-5, rtol=0)
    shipped = learner.encoder.pooled(texts)
    for merged in ([False, True] if train_params == "lora" else [True]):
        out = export_model(learner, tmp_path / f"export-{merged}", merged=merged)
        np.testing.assert_array_equal(learner.encoder.pooled(texts), shipped)  # the base model is untouched
        assert (out / "recstream.json").is_file()
        assert (out / ("adapter_config.json" if not merged else "config.json")).is_file()
        np.testing.assert_allclose(load_exported(out).pooled(texts), mine, atol=1e-5, rtol=0)
    if train_params == "lora":
        _check_plain_peft_load(tmp_path / "export-False", learner, texts, mine)
    else:
        with pytest.raises(ConfigError):
            export_model(learner, tmp_path / "no-adapter", merged=False)


def _check_plain_peft_load(folder: Path, learner, texts, expected) -> None:
    """Elsewhere, with nothing of recstream: transformers + peft + the folder's pooling."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    config = json.loads((folder / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == Path(learner.encoder.path).resolve()
    info = json.loads((folder / "recstream.json").read_text())
    base = AutoModel.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    for i, text in enumerate(texts):  # one text at a time: no padding questions
        ids = tokenizer(info["document_prompt"] + text, truncation=True, max_length=info["max_tokens"],
                        return_tensors="pt")
        ids.pop("token_type_ids", None) if info["family"] == "decoder" else None
        with torch.no_grad():
            states = model(**ids).last_hidden_state[0]
        vector = states[-1] if info["pooling"] == "last_token" else states.mean(0)
        np.testing.assert_allclose(vector.numpy(), expected[i], atol=1e-5, rtol=0)


def test_full_training_runs(models, tmp_path):
    world = SyntheticWorld(n_items=40, n_users=20, drift_every=10)
    learner = _learner(models["llama"], "full")
    assert learner.encoder.train_layers == len(encoder_layers(learner.encoder.model))
    reports = _run(learner, world, 140)
    assert all(np.isfinite(r.loss) for r in reports)
    assert learner.parts.ewc.state_bytes() == 2 * trainable_parameters(learner.model) * 4
    texts = [item.text for item in world.items()[:6]]
    out = export_model(learner, tmp_path / "full", merged=True)
    np.testing.assert_allclose(load_exported(out).pooled(texts), learner.encoder.top_pooled(texts, learner.top),
                               atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_and_checkpointing(models):
    config = LearnerConfig(model_path=str(models["qwen2"]), device="cuda", train_layers=2, train_params="lora",
                           max_text_tokens=24, vector_dim=16, history_length=8, batch_size=32, negatives=16,
                           replay_size=200, replay_batch=8, gradient_checkpointing=True)
    learner = ContinualRecommender(config)
    assert learner.top.gradient_checkpointing
    reports = _run(learner, SyntheticWorld(n_items=60, n_users=30, drift_every=10))
    assert all(np.isfinite(r.loss) for r in reports)
    assert all(p.dtype == torch.float32 for p in learner.model.parameters() if p.requires_grad)
    assert np.isfinite(learner.item_vectors()).all()


# -- settings -----------------------------------------------------------------------------------------

def test_settings_map_to_the_learner_config(models):
    from stream.config import Settings
    from stream.learner_setup import learner_config

    settings = Settings(model=str(models["qwen2"]), train_params="lora", lora_rank=4, lora_alpha=8.0,
                        lora_targets="q_proj, k_proj,v_proj", gradient_checkpointing=True, train_layers=2)
    config = learner_config(settings)
    assert (config.train_params, config.lora_rank, config.lora_alpha, config.gradient_checkpointing) == \
        ("lora", 4, 8.0, True)
    assert config.lora_targets == ("q_proj", "k_proj", "v_proj")
    enc = TextEncoder.from_config(config, CPU)
    names = {n for n, p in enc.top.named_parameters() if p.requires_grad}
    assert {n.split(".")[3] for n in names} == {"q_proj", "k_proj", "v_proj"}
    assert learner_config(Settings()).train_params == "top"


# -- the worker (optional, slower) ---------------------------------------------------------------------

@pytest.mark.integration
def test_worker_trains_a_tiny_decoder_with_lora(models, broker, unique_topic, tmp_path):
    from stream.kafka.broker import read_topic
    from worker_harness import WorkerProcess, make_topics, produce_events, produce_items

    topics = make_topics(broker.bootstrap, unique_topic)
    world = SyntheticWorld(n_items=60, n_users=30, drift_every=10, seed=5)
    events = list(world.events(400, id_prefix=f"lora-{tmp_path.name}"))
    produce_items(broker.bootstrap, topics.items, world.items())
    produce_events(broker.bootstrap, topics.events, events)
    worker = WorkerProcess(broker.bootstrap, topics, tmp_path / "state", tmp_path / "worker.log",
                           model=models["qwen2"], train_params="lora", train_layers=2, lora_rank=4,
                           max_text_tokens=24, vector_dim=16, batch_size=32, negatives=16, experience_size=100,
                           history_length=8, replay_size=500, replay_batch=8, checkpoint_interval_s=3)
    try:
        final = worker.wait_for(lambda m: m.get("recstream_events_consumed_total", 0) >= len(events)
                                and m.get("recstream_pending_events", 1) == 0
                                and m.get("recstream_model_version", 0) >= 3
                                and m.get("recstream_checkpoints_total", 0) >= 1, 240, "trained and checkpointed")
        code = worker.terminate()
    except BaseException:
        worker.kill()
        raise
    assert code == 0, worker.tail()
    assert final["recstream_train_loss"] == final["recstream_train_loss"]  # not NaN
    assert final.get("recstream_checkpoint_failures_total", 0) == 0, worker.tail()
    vectors = [json.loads(r.value)["vector"] for r in read_topic(broker.bootstrap, topics.vectors)]
    assert vectors and all(abs(np.linalg.norm(v) - 1.0) < 1e-4 for v in vectors)
