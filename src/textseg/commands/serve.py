"""``textseg serve``: the web page and REST API on one loaded model."""

from __future__ import annotations

from textseg.commands import add_precision_argument, add_templates_argument


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the upload-and-type web page and the REST API (FastAPI + uvicorn)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="model name (default: the offline default model)")
    p.add_argument("--weights", default=None, help="checkpoint file or folder (format detected)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest accepted image, in pixels")
    p.add_argument("--max-labels", type=int, default=100, help="most labels per request")
    p.add_argument("--max-prompts", type=int, default=400,
                   help="most label texts per request, synonyms included (default 400)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request time limit in seconds")
    p.add_argument("--workers", type=int, default=1, help="threads running the model")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="batch the image-tower passes of up to N concurrent uploads into one forward "
                   "(0 = off; default: 8 on CUDA, off on CPU)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="MS",
                   help="the longest a batch waits for more requests after its first (default 10 ms)")
    p.add_argument("--max-queue", type=int, default=32, help="requests admitted at once; more get 503")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another name the Host header may carry (repeatable; default: only the bound address)")
    p.add_argument("--image-cache-mb", type=float, default=64.0, help="memory for cached image features")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a request head may take")
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds a request body may take")
    p.add_argument("--max-connections", type=int, default=128, help="open connections; more get 503")
    add_templates_argument(p, "imagenet")
    add_precision_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from textseg.errors import TextsegError

    try:
        import uvicorn

        from textseg.serve.app import ServeSettings, create_app, server_config
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("uvicorn", "fastapi", "starlette", "multipart", "python_multipart"):
            raise
        raise TextsegError(f"the web server needs the 'serve' extra ({e.name} is not installed): "
                           "pip install 'textseg[serve]'") from None

    settings = ServeSettings(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_labels=args.max_labels,
        max_prompts=args.max_prompts,
        timeout_s=args.timeout,
        workers=args.workers,
        batch=args.batch,
        batch_wait_s=args.batch_wait_ms / 1000.0,
        max_queue=args.max_queue,
        image_cache_bytes=int(args.image_cache_mb * 1024 * 1024),
        host=args.host,
        allowed_hosts=tuple(args.allowed_host),
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        max_connections=args.max_connections,
    )
    app = create_app(model_name=args.model, weights=args.weights, settings=settings, templates=args.templates,
                     precision=args.precision, cast_weights=args.cast_weights)
    print(f"textseg serving {app.state.service.model.name!r} on http://{args.host}:{args.port}/", flush=True)
    uvicorn.Server(server_config(app, args.port)).run()
    return 0
