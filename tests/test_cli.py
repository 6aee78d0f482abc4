"""The `pagellm` command line: flags and help, and `generate` / `chat` as real subprocesses on a
tiny random Llama, compared with the offline LLM API."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pagellm.entrypoints import cli

REPO_ROOT = Path(__file__).resolve().parents[1]

SERVE_FLAGS = ["--host", "--port", "--api-key", "--served-model-name", "--dtype", "--max-model-len",
               "--max-num-seqs", "--max-num-batched-tokens", "--gpu-memory-utilization", "--kv-cache-memory",
               "--chat-template", "--generation-config", "--enforce-eager", "--seed", "--uvicorn-log-level",
               "--load-format", "--allowed-origins", "--allowed-methods", "--allowed-headers", "--allow-credentials"]


def _subparser(parser, *path):
    for name in path:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]
    return parser


def test_serve_help_documents_every_flag():
    text = _subparser(cli.build_parser(), "serve").format_help()
    for flag in SERVE_FLAGS:
        assert flag in text, flag
    assert "MODEL" in text


def test_serve_flags_become_engine_args_and_server_config(monkeypatch, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    args = cli.build_parser().parse_args(
        ["serve", "/models/x", "--port", "9001", "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len",
         "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "1024", "--kv-cache-memory", "1GiB",
         "--gpu-memory-utilization", "0.5", "--seed", "3", "--enforce-eager", "--served-model-name", "a", "b",
         "--chat-template", str(template), "--generation-config", "vllm", "--load-format", "dummy"])
    engine_args = cli.engine_args_from(args, cli._model_from(args), "a")
    assert engine_args.model == "/models/x" and engine_args.max_model_len == 512
    assert engine_args.max_num_seqs == 8 and engine_args.max_num_batched_tokens == 1024
    assert engine_args.kv_cache_memory == "1GiB" and engine_args.gpu_memory_utilization == 0.5
    assert engine_args.seed == 3 and engine_args.enforce_eager and engine_args.load_format == "dummy"
    assert engine_args.served_model_name == "a" and engine_args.generation_config == "vllm"
    monkeypatch.setenv("PAGELLM_API_KEY", "from-env")
    config = cli.server_config_from(args)
    assert config.port == 9001 and config.host == "127.0.0.1" and config.served_model_names == ("a", "b")
    assert config.chat_template == "{{ messages[0]['content'] }}"  # read from the file
    assert config.api_key == "from-env"
    args.api_key = "from-flag"
    assert cli.server_config_from(args).api_key == "from-flag"


def test_cors_flags_take_json_lists_as_vllm():
    default = cli.server_config_from(cli.build_parser().parse_args(["serve"]))
    assert (default.allowed_origins, default.allowed_methods, default.allowed_headers) == (("*",), ("*",), ("*",))
    assert not default.allow_credentials
    args = cli.build_parser().parse_args(["serve", "--allowed-origins", '["http://a.test", "http://b.test"]',
                                          "--allowed-methods", '["GET", "POST"]', "--allow-credentials"])
    config = cli.server_config_from(args)
    assert config.allowed_origins == ("http://a.test", "http://b.test") and config.allowed_methods == ("GET", "POST")
    assert config.allowed_headers == ("*",) and config.allow_credentials
    for bad in ("http://a.test", '{"a": 1}', "[1]"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", "--allowed-origins", bad])


def test_bad_flag_values_are_reported():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--port", "eighty"])
    args = cli.build_parser().parse_args(["serve", "--chat-template", "missing/template.jinja"])
    with pytest.raises(ValueError, match="chat_template"):
        cli.server_config_from(args)
    args = cli.build_parser().parse_args(["serve", "--load-format", "dummy", "--dtype", "float64"])
    with pytest.raises(ValueError, match="dtype"):
        cli.engine_args_from(args, None)


def test_bench_subcommands_are_wired():
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "serve", "--num-prompts", "3", "--request-rate", "2.5", "--endpoint",
                              "/v1/chat/completions"])
    from pagellm.benchmarks import serve as bench_serve
    assert args.handler is bench_serve.main and args.num_prompts == 3 and args.request_rate == 2.5
    for name in ("throughput", "latency"):
        sub = _subparser(parser, "bench", name)
        assert sub.get_default("handler") is not None


def test_bench_serve_arrivals_and_workload():
    from pagellm.benchmarks import serve as bench_serve

    assert bench_serve.arrival_delays(3, float("inf"), 0) == [0.0, 0.0, 0.0]
    gaps = bench_serve.arrival_delays(2000, 4.0, 0)
    assert abs(sum(gaps) / len(gaps) - 0.25) < 0.03  # Poisson at 4 req/s: mean gap 1/4 s
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "serve", "--num-prompts", "5", "--random-input-len", "10",
                              "--random-output-len", "6", "--random-range-ratio", "0.5"])
    work = bench_serve.build_workload(args)
    assert len(work.prompts) == 5
    assert all(5 <= len(p) <= 15 for p in work.prompts) and all(3 <= m <= 9 for m in work.max_tokens)
    args = parser.parse_args(["bench", "serve", "--workload", "cpu-thr", "--num-prompts", "4"])
    work = bench_serve.build_workload(args)
    assert len(work.prompts) == 4 and all(50 <= len(p) <= 256 for p in work.prompts)


def test_bench_latency_writes_vllms_json_keys(monkeypatch, tmp_path):
    """vLLM's latency JSON: avg_latency, latencies and percentiles (seconds); pagellm's keys stay."""
    import json

    import pagellm
    from pagellm.benchmarks import latency

    runs = iter([(0.1, 0.01, 1.0), (0.1, 0.01, 2.0), (0.1, 0.01, 3.0), (0.1, 0.01, 4.0)])
    monkeypatch.setattr(pagellm, "LLM", lambda *a, **k: type("FakeLLM", (), {"llm_engine": None})())
    monkeypatch.setattr(latency, "_one_run", lambda engine, prompts, output_len: next(runs))
    out = tmp_path / "lat.json"
    args = cli.build_parser().parse_args(["bench", "latency", "--input-len", "4", "--output-len", "3",
                                          "--batch-size", "2", "--num-iters-warmup", "0", "--num-iters", "4",
                                          "--output-json", str(out)])
    latency.main(args)
    r = json.loads(out.read_text())
    assert r["latencies"] == [1.0, 2.0, 3.0, 4.0] and r["avg_latency"] == 2.5
    assert set(r["percentiles"]) == {"10", "25", "50", "75", "90", "99"} and r["percentiles"]["50"] == 2.5
    assert abs(r["tpot_ms_median"] - 10.0) < 1e-9 and len(r["tpot_ms_all"]) == 4


def test_bench_throughput_takes_vllms_flags_and_writes_its_keys(monkeypatch, tmp_path):
    """`--dataset-name random` parses (throughput and serve); the JSON has vLLM's total_num_tokens."""
    import json
    from types import SimpleNamespace

    from pagellm.benchmarks import throughput

    def generate(prompts, params, use_tqdm=False):
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[0] * p.max_tokens)],
                                metrics=SimpleNamespace(arrival_time=0.0, first_token_time=0.01)) for p in params]

    engine = SimpleNamespace(num_preemptions=0, stats=lambda: SimpleNamespace(prefix_cache_hit_rate=0.0))
    monkeypatch.setattr(throughput, "make_llm", lambda args: SimpleNamespace(generate=generate, llm_engine=engine))
    out = tmp_path / "thr.json"
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "throughput", "--dataset-name", "random", "--random-input-len", "8",
                              "--random-output-len", "4", "--num-prompts", "3", "--output-json", str(out)])
    throughput.main(args)
    r = json.loads(out.read_text())
    assert r["num_requests"] == 3 and r["total_num_tokens"] == 3 * (8 + 4)
    assert abs(r["tokens_per_second"] - r["total_num_tokens"] / r["elapsed_time"]) < 1e-6 * r["tokens_per_second"]
    args = parser.parse_args(["bench", "serve", "--dataset-name", "random", "--random-input-len", "8"])
    assert args.dataset_name == "random"


def test_bench_serve_summary_has_vllms_duration_key():
    from pagellm.benchmarks import serve as bench_serve

    ok = bench_serve.RequestResult(success=True, prompt_len=4, output_tokens=3, ttft=0.1, latency=0.3,
                                   itl=[0.1, 0.1])
    s = bench_serve.summarize([ok], 2.0)
    assert s["duration"] == 2.0 and s["duration_s"] == 2.0 and s["completed"] == 1


# ---- generate and chat as subprocesses ------------------------------------------------------------------


ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory", "64MiB"]


def _start(args: list[str], stdin: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=os.environ.get("PAGELLM_TEST_THREADS", "1"))
    source = subprocess.DEVNULL
    if stdin is not None:
        # A file rather than a pipe, so several children can run before anyone is read.
        source = tempfile.TemporaryFile("w+")
        source.write(stdin)
        source.seek(0)
    return subprocess.Popen([sys.executable, "-m", "pagellm.entrypoints.cli", *args], cwd=REPO_ROOT, env=env,
                            stdin=source, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_generate_and_chat_commands_match_offline_api(tiny_llama_dir, tiny_llm):
    from pagellm import SamplingParams

    model = str(tiny_llama_dir)
    # All commands start at once: most of their time is importing torch.
    generate = _start(["generate", "The weather today is", "--model", model, "--max-tokens", "6",
                       "--temperature", "0", "--ignore-eos", *ENGINE_FLAGS])
    # A seeded sample: a random model's greedy chat reply is just newlines.
    chat = _start(["chat", model, "--max-tokens", "5", "--temperature", "1", "--sampling-seed", "7", *ENGINE_FLAGS],
                  stdin="Hello!\n\nHow are you?\n/exit\nnever read\n")
    bad = _start(["generate", "hi", "--model", model, "--temperature", "-1", *ENGINE_FLAGS])
    gen_out, gen_err = generate.communicate(timeout=300)
    chat_out, chat_err = chat.communicate(timeout=300)
    _, bad_err = bad.communicate(timeout=300)
    assert generate.returncode == 0, gen_err[-3000:]
    assert chat.returncode == 0, chat_err[-3000:]
    assert bad.returncode != 0  # bad input: one line naming the field, no traceback
    assert "temperature" in bad_err and "Traceback" not in bad_err

    llm = tiny_llm  # conftest's engine on the same folder, same dtype and context
    expected = llm.generate("The weather today is", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text
    assert gen_out == expected + "\n"

    params = SamplingParams(temperature=1.0, seed=7, max_tokens=5)
    history = [{"role": "user", "content": "Hello!"}]
    first = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "How are you?"}]
    second = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
    assert first.strip() and second.strip()
    assert chat_out == first + "\n" + second + "\n"  # the blank line is skipped; /exit ends it
