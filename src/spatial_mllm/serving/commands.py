"""`spatial-mllm chat` (a terminal conversation with a model folder) and `spatial-mllm serve` (the OpenAI-compatible
server with its web page)."""

from __future__ import annotations

import argparse

from .settings import MIB, ServerSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_chat(subparsers)
    _register_serve(subparsers)
    _register_vllm_check(subparsers)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (trained, merged or imported)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="where the model runs (default: cpu)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="weights' dtype (default: as saved)")
    parser.add_argument("--chat-template", help="Jinja chat template file to use instead of the folder's own")


def _register_chat(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="talk to a model in the terminal",
        description="A multi-turn conversation. /image PATH attaches an image to the next turn, /reset starts "
        "over, /quit (or Ctrl-D) ends. Answers are printed as they are generated; greedy unless --temperature.",
    )
    _model_arguments(parser)
    parser.add_argument("--image", help="image attached to the first turn")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, help="seed for sampling, so a conversation can be replayed")
    parser.set_defaults(func=_chat)


def _chat(args: argparse.Namespace) -> int:
    import warnings

    from transformers import TextStreamer

    # The terminal shows the conversation: library deprecation notices would land in the middle of an answer.
    warnings.filterwarnings("ignore", category=FutureWarning)

    from .chat import ChatSession
    from .loading import load_chat_model

    model, processor = load_chat_model(args.model, args.device, args.dtype, args.chat_template)
    session = ChatSession(model, processor, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    print(f"{args.model}: {model.config.projector_type}, {model.num_image_tokens} image tokens. "
          "/image PATH attaches an image to the next turn, /reset starts over, /quit ends.")
    if args.image:
        _attach(session, args.image)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            print("(conversation cleared)")
        elif line.startswith("/image"):
            path = line[len("/image"):].strip()
            if path:
                _attach(session, path)
            else:
                print("usage: /image PATH")
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]}: /image PATH, /reset, /quit")
        else:
            print("assistant> ", end="", flush=True)
            try:
                session.reply(line, streamer)
            except ValueError as err:
                print(f"\n{err}")
            except KeyboardInterrupt:
                print("\n(interrupted; the turn was not kept)")


def _attach(session, path: str) -> None:
    try:
        image = session.attach(path)
    except ValueError as err:
        print(f"cannot attach {err}")
        return
    print(f"(image {path}, {image.width}x{image.height}, attached to the next turn)")


def _register_serve(subparsers: argparse._SubParsersAction) -> None:
    defaults = ServerSettings()
    parser = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible server (/v1/chat/completions, streaming) with a web page at /",
        description="One process: FastAPI + uvicorn, requests batched together as they arrive. Errors use the "
        "OpenAI envelope; limits are checked before any work.",
    )
    _model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name",
                        help="name clients send as `model` (default: the folder and its parent, e.g. saep/stage2)")
    parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/*")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help=f"requests waiting for a batch slot before 503 (default {defaults.max_queue})")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                        help=f"sequences generated together (default {defaults.max_batch_size})")
    parser.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                        help=f"largest request body (default {defaults.max_request_bytes // MIB} MiB)")
    parser.add_argument("--max-image-bytes", type=int, default=defaults.max_image_bytes,
                        help=f"largest image, encoded (default {defaults.max_image_bytes // MIB} MiB)")
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels,
                        help=f"largest image, width x height (default {defaults.max_image_pixels})")
    parser.add_argument("--limit-images", type=int, default=defaults.limit_images,
                        help=f"images per request (default {defaults.limit_images})")
    parser.add_argument("--max-model-len", type=int, help="prompt + answer tokens (default: the LM's context)")
    parser.add_argument("--allowed-media-domains", nargs="+", default=[],
                        help="hosts whose http(s) image URLs may be fetched (default: none, data: URLs only)")
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .server import serve

    settings = ServerSettings(
        served_model_name=args.served_model_name or "/".join(Path(args.model).resolve().parts[-2:]),
        api_key=args.api_key,
        max_queue=args.max_queue,
        max_batch_size=args.max_batch_size,
        max_request_bytes=args.max_request_bytes,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        limit_images=args.limit_images,
        max_model_len=args.max_model_len,
        allowed_media_domains=tuple(domain.lower() for domain in args.allowed_media_domains),
    )

    def ready(url: str) -> None:
        print(f"serving {args.model} as {settings.served_model_name!r}: web page {url}/ , API {url}/v1", flush=True)

    serve(args.model, settings, args.host, args.port, args.device, args.dtype, args.chat_template, on_ready=ready)
    return 0


def _register_vllm_check(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "vllm-check",
        help="what vLLM's Transformers backend needs from a model folder, checked without vLLM",
        description="Loads the folder on the CPU and checks each requirement of `vllm serve DIR --trust-remote-code` "
        "(Transformers modeling backend); exits 1 if any is unmet.",
    )
    parser.add_argument("--model", required=True, help="model folder")
    parser.set_defaults(func=_vllm_check)


def _vllm_check(args: argparse.Namespace) -> int:
    from .vllm_contract import check_folder

    requirements = check_folder(args.model)
    for requirement in requirements:
        print(f"{'met  ' if requirement.met else 'UNMET'} {requirement.name}: {requirement.detail}")
    unmet = sum(not r.met for r in requirements)
    print(f"{len(requirements) - unmet} of {len(requirements)} requirements met")
    return 1 if unmet else 0


__all__ = ["register"]
