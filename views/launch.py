"""LCLM Studio's launcher: parse flags, load the model, launch the UI on 127.0.0.1.

    lclm-studio [--port P] [--host H] [--auth USER:PASSWORD] [--checkpoint DIR ...] [--device cpu|cuda] [--share]

Uploads go to a private directory (mode 0o700) and each is deleted once read; the login may
also come from LCLM_STUDIO_AUTH (user:password).
"""

from __future__ import annotations

import argparse
import signal
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lclm-studio", description="LCLM Studio")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                        help="require this login (default: $LCLM_STUDIO_AUTH, else none); "
                             "give one whenever --host is not a loopback address")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="LCLM directory in the published layout, or a hub id; repeat for several ratios "
                             "(default: the embedded model)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when present)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=None,
                        help="auto (default, or $LCLM_STUDIO_DTYPE): bfloat16 on CUDA and on CPUs that multiply it "
                             "fast (a short probe decides), else float32")
    parser.add_argument("--decoder", choices=("transformers", "vllm"), default=None,
                        help="who decodes full context, LCLM and EXPAND: transformers in this process (default, or "
                             "$LCLM_STUDIO_DECODER; one question at a time), or vllm: vLLM servers from the serving "
                             "environment (make serving), started on first use, many questions at once")
    parser.add_argument("--decoder-url", action="append", default=None, metavar="URL",
                        help="a vLLM server already running (lclm serve-decoder); implies --decoder vllm; repeatable")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default, or $LCLM_STUDIO_THREADS: one per core that other processes "
                             "leave free at start)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    return parser.parse_args(argv)


def create_workspace(args: argparse.Namespace):
    """The process-wide workspace with its default model loaded; progress printed as it goes."""
    from app.engine.service import Studio
    from app.engine.settings import Settings
    from app.studio.catalog import build_catalog
    from app.studio.latent_analysis import warm_umap_in_background
    from app.studio.workspace import Workspace
    from model.threads import apply_threads

    warm_umap_in_background()
    urls = tuple(args.decoder_url or ())
    settings = Settings.from_env(device=args.device, dtype=args.dtype, decoder="vllm" if urls else args.decoder,
                                 decoder_urls=urls or None, threads=args.threads)
    threads = apply_threads(settings.threads)
    print(f"torch threads: {threads.threads} ({threads.reason})", flush=True)
    studio = Studio(settings, checkpoint=(args.checkpoint or [None])[0])
    catalog = build_catalog(args.checkpoint)
    default = catalog.default
    print(f"loading {default.family} {default.label} (the first start converts the embedded model once) ...",
          flush=True)
    studio.model(default.spec, default.ratio, default.pooling,
                 progress=lambda stage, done, total: print(f"... {stage}", flush=True))
    choice = studio.dtype_choice()
    print(f"dtype {choice.name} ({choice.reason})", flush=True)
    return Workspace(studio, catalog)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from app.console import user_terminal

    with user_terminal():  # our warnings as lines on stderr; the libraries' kept off the terminal
        return serve(args)


def serve(args: argparse.Namespace) -> int:
    from app.studio.serving import auth_from, bind_warning, private_upload_dir
    from model.errors import UserError

    # SIGTERM ends the studio as Ctrl-C does, through exit handlers: the vLLM servers it started
    # (app/engine/decoder_server.py) and its private upload directory go with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        auth = auth_from(args.auth)
        warning = bind_warning(args.host, auth)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        private_upload_dir()  # before gradio is imported
        workspace = create_workspace(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from app.ingest import MAX_FILE_BYTES
    from views.studio import CSS, build_app

    demo = build_app(workspace)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, inbrowser=False, quiet=True,
                prevent_thread_lock=True, css=CSS, auth=auth, max_file_size=MAX_FILE_BYTES)
    print(f"LCLM Studio at {demo.local_url}", flush=True)
    if demo.share_url:
        print(f"public link: {demo.share_url}", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
