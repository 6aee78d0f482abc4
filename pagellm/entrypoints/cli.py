"""The `pagellm` command: serve | generate | chat | bench {serve, throughput, latency}.

Flag names follow vLLM's, so a `vllm serve` command line carries over. Heavy imports (torch,
the engine, uvicorn) happen inside the subcommands, so `pagellm --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable, Sequence

from pagellm.models.loader import LOAD_FORMATS

DEFAULT_MODEL_HELP = "HF model folder or .gguf file (default: the bundled SmolLM2-135M-Instruct)"


# ---- shared flags ---------------------------------------------------------------------------------


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine flags every model-running subcommand takes (vLLM's names)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder or .gguf file (default: the model's own)")
    g.add_argument("--dtype", default="auto",
                   help="weights and activations dtype: auto, bfloat16, float16, float32 (default: auto)")
    g.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="how to read the weights; 'dummy' makes random weights (default: auto)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length in tokens, prompt plus output (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one batch (default: 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="most tokens in one step (default on GPU: 8192 for the server, 16384 offline; 2048 on CPU)")
    g.add_argument("--block-size", type=int, default=16, choices=[8, 16, 32, 64, 128],
                   help="tokens per KV cache block (default: 16)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and KV cache (default: 0.9)")
    g.add_argument("--kv-cache-memory", default=None,
                   help="KV cache size, e.g. 4GiB or 512MiB (default: from the device's free memory)")
    g.add_argument("--generation-config", default="auto", choices=["auto", "pagellm", "vllm"],
                   help="'auto': sampling defaults from the model's generation_config.json; "
                        "'pagellm'/'vllm': the engine's own defaults (default: auto)")
    g.add_argument("--enforce-eager", action="store_true", help="never capture CUDA graphs")
    g.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true", default=True,
                   help="reuse the KV blocks of repeated prompt prefixes (default: on)")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn automatic prefix caching off")
    g.add_argument("--seed", type=int, default=0, help="random seed of the engine (default: 0)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def engine_args_from(args: argparse.Namespace, model: str | None, served_model_name: str | None = None,
                     usage_context: str = "llm"):
    """EngineArgs from parsed flags. Raises ValueError for a bad value."""
    from pagellm.engine.args import EngineArgs, resolve_task

    return EngineArgs(model=model, tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len,
                      max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                      block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                      gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
                      enforce_eager=args.enforce_eager, load_format=args.load_format,
                      generation_config=args.generation_config, device=args.device,
                      served_model_name=served_model_name,
                      enable_prefix_caching=getattr(args, "enable_prefix_caching", True),
                      task=resolve_task(getattr(args, "task", None), getattr(args, "runner", None)),
                      usage_context=usage_context)


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int | None) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"most tokens to generate (default: {max_tokens or 'up to the context length'})")
    g.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the model's generation_config, else 1.0)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: the model's)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens; 0 = all")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p times the top probability")
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    g.add_argument("--sampling-seed", type=int, default=None, help="seed of this request's sampling")
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeat the flag for more)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def sampling_params_from(args: argparse.Namespace, defaults):
    """SamplingParams from the flags, the model's defaults filling what was not given."""
    from pagellm.sampling_params import SamplingParams

    fields = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
              "repetition_penalty": args.repetition_penalty}
    chosen = {k: (v if v is not None else getattr(defaults, k)) for k, v in fields.items()}
    return SamplingParams(max_tokens=args.max_tokens, seed=args.sampling_seed, stop=args.stop,
                          ignore_eos=args.ignore_eos, **chosen)


def _add_model_arguments(parser: argparse.ArgumentParser, positional: bool) -> None:
    if positional:
        parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help=DEFAULT_MODEL_HELP)
    parser.add_argument("--model", default=None, help=DEFAULT_MODEL_HELP + ("; same as MODEL" if positional else ""))


def _model_from(args: argparse.Namespace) -> str | None:
    tag = getattr(args, "model_tag", None)
    if tag is not None and args.model is not None and tag != args.model:
        raise ValueError(f"model given twice: {tag!r} and --model {args.model!r}")
    return tag if tag is not None else args.model


# ---- subcommands ----------------------------------------------------------------------------------


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible server",
                       description="Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, "
                                   "/v1/models, /tokenize, /detokenize, /health, /metrics, /version); with "
                                   "--task embed, an embedding model on /v1/embeddings.")
    _add_model_arguments(p, positional=True)
    g = p.add_argument_group("server")
    g.add_argument("--host", default=None, help="address to listen on (default: all interfaces)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the API (default: $PAGELLM_API_KEY; none if unset)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in 'model' (default: the model argument)")
    g.add_argument("--chat-template", default=None, help="chat template: a Jinja file path or the template inline "
                                                         "(default: the model's)")
    g.add_argument("--task", default=None, choices=["generate", "embed", "embedding"],
                   help="'generate' (text models) or 'embed' (embedding models such as BERT: serves "
                        "/v1/embeddings) (default: generate)")
    g.add_argument("--runner", default=None, choices=["auto", "generate", "pooling"],
                   help="vLLM's spelling of --task: 'pooling' is --task embed")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level (default: info)")
    for flag, what in (("origins", "origins"), ("methods", "HTTP methods"), ("headers", "request headers")):
        g.add_argument(f"--allowed-{flag}", type=_json_string_list(f"--allowed-{flag}"), default=["*"],
                       help=f'CORS: the {what} allowed, as a JSON list (default: ["*"])')
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    add_engine_arguments(p)
    p.set_defaults(handler=cmd_serve)


def _json_string_list(flag: str) -> Callable[[str], list[str]]:
    """Parser of a flag given as a JSON list of strings, as vLLM's CORS flags are."""
    def parse(text: str) -> list[str]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError(f"{flag} takes a JSON list of strings, e.g. '[\"*\"]'; got {text!r}")
        return value
    return parse


def server_config_from(args: argparse.Namespace):
    """ServerConfig from `serve` flags; the API key falls back to $PAGELLM_API_KEY."""
    from pagellm.entrypoints.openai.server import API_KEY_ENV, ServerConfig, load_chat_template

    return ServerConfig(host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                        served_model_names=tuple(args.served_model_name or ()),
                        chat_template=load_chat_template(args.chat_template),
                        uvicorn_log_level=args.uvicorn_log_level, allowed_origins=tuple(args.allowed_origins),
                        allowed_methods=tuple(args.allowed_methods), allowed_headers=tuple(args.allowed_headers),
                        allow_credentials=args.allow_credentials)


def cmd_serve(args: argparse.Namespace) -> None:
    from pagellm.entrypoints.openai.server import run_server

    _configure_logging(logging.INFO)
    config = server_config_from(args)
    names = config.served_model_names
    run_server(engine_args_from(args, _model_from(args), names[0] if names else None, "server"), config)


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete one prompt and print the text",
                       description="Load a model, complete PROMPT and stream the completion to stdout.")
    p.add_argument("prompt", metavar="PROMPT", help="the text to complete")
    _add_model_arguments(p, positional=False)
    p.add_argument("--chat", action="store_true", help="send PROMPT as a user message through the chat template")
    add_sampling_arguments(p, max_tokens=64)
    add_engine_arguments(p)
    p.set_defaults(handler=cmd_generate)


def _terminal_engine(args: argparse.Namespace):
    """(LLMEngine, SamplingParams) for the terminal commands, with quiet logging."""
    from pagellm.engine.engine import LLMEngine

    _configure_logging(logging.WARNING)
    engine = LLMEngine(engine_args_from(args, _model_from(args)))
    return engine, sampling_params_from(args, engine.default_sampling_params())


def cmd_generate(args: argparse.Namespace) -> None:
    from pagellm.entrypoints.chat_cli import stream_text

    engine, params = _terminal_engine(args)
    prompt: object = args.prompt
    if args.chat:
        text = engine.inputs.render_chat([{"role": "user", "content": args.prompt}])
        prompt = {"prompt": text, "prompt_token_ids": engine.inputs.encode_chat(text)}
    for piece in stream_text(engine, prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _add_chat_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal",
                       description="An interactive chat that streams the model's replies. One message per line; "
                                   "/clear starts over, /exit or end of input quits.")
    _add_model_arguments(p, positional=True)
    p.add_argument("--system-prompt", default=None, help="a system message to start the conversation with")
    p.add_argument("--chat-template", default=None, help="a Jinja file path or the template inline")
    add_sampling_arguments(p, max_tokens=None)
    add_engine_arguments(p)
    p.set_defaults(handler=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> None:
    from pagellm.entrypoints.chat_cli import run_chat
    from pagellm.entrypoints.openai.server import load_chat_template

    engine, params = _terminal_engine(args)
    run_chat(engine, params, args.system_prompt, load_chat_template(args.chat_template))


# ---- bench ----------------------------------------------------------------------------------------

# subcommand -> (module, help). Imported when the parser is built, each on its own, so one
# missing or broken benchmark does not take the rest of the command line down.
_BENCHMARKS = {
    "serve": ("pagellm.benchmarks.serve", "load-test a running OpenAI-compatible server"),
    "throughput": ("pagellm.benchmarks.throughput", "offline throughput of the engine"),
    "latency": ("pagellm.benchmarks.latency", "latency of one batch"),
}


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    import importlib

    bench = sub.add_parser("bench", help="benchmarks: serve, throughput, latency")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="{serve,throughput,latency}")
    bench_sub.required = True
    for name, (module_name, help_text) in _BENCHMARKS.items():
        p = bench_sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(handler=module.main)
        except Exception as exc:  # noqa: BLE001 - report it when that benchmark is asked for
            p.set_defaults(handler=_unavailable(name, exc))


def _unavailable(name: str, exc: Exception) -> Callable[[argparse.Namespace], None]:
    def handler(_: argparse.Namespace) -> None:
        raise SystemExit(f"pagellm bench {name} is not available: {type(exc).__name__}: {exc}")
    return handler


# ---- entry point ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagellm", description="pagellm: LLM inference and serving.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{serve,generate,chat,bench}")
    _add_serve_parser(sub)
    _add_generate_parser(sub)
    _add_chat_parser(sub)
    _add_bench_parser(sub)
    return parser


def _configure_logging(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _serve_with_passive_openmp() -> None:
    """Re-executes `pagellm serve` with OMP_WAIT_POLICY=PASSIVE unless the user chose a policy.

    OpenMP threads (libgomp) spin after each parallel region by default. Offline that is fastest,
    but a server's event loop and its clients need the CPU between engine steps, and spinning
    threads take it: on the 2-core CPU VM the shared-prefix serving benchmark ran 1.9x faster with
    passive threads (and offline generation 15% slower, so only the server asks for it). OpenMP
    reads the policy once, when torch loads, hence the re-exec.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, "-m", "pagellm.entrypoints.cli", *sys.argv[1:]])


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and args.command == "serve":
        _serve_with_passive_openmp()
    if args.version:
        import pagellm
        print(pagellm.__version__)
        return
    if getattr(args, "handler", None) is None:
        parser.print_help()
        raise SystemExit(2)
    try:
        args.handler(args)
    except ValueError as exc:
        # Bad flags or input: one line, not a traceback.
        raise SystemExit(f"pagellm {args.command}: error: {exc}") from exc
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
