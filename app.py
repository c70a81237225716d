"""LCLM Studio entry point: parse flags, prepare the model, launch the UI on 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LCLM Studio")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--checkpoint", default=None, help="LCLM directory or hub id (default: the embedded model)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when present)")
    return parser.parse_args(argv)


def build_placeholder(studio):
    """Until the studio UI lands: a page that says so, backed by the real services."""
    import gradio as gr

    with gr.Blocks(title="LCLM Studio") as demo:
        gr.Markdown(
            "# LCLM Studio\nThe full studio (document, compress, latents, reconstruction, ask, metrics tabs) is "
            "not built yet. Meanwhile this page compresses a pasted document with the loaded model; "
            "the command line (`python -m app.cli --help`) does everything else."
        )
        text = gr.Textbox(label="Document", lines=10)
        ratio = gr.Radio([4, 8, 16], value=16, label="Compression ratio 1:N")
        result = gr.JSON(label="Result")

        def compress(document: str, n: int) -> dict:
            from model.errors import UserError

            try:
                return studio.compress(document, ratio=int(n)).result.to_dict()
            except UserError as err:
                raise gr.Error(str(err)) from None

        gr.Button("Compress").click(compress, [text, ratio], result, api_name="compress")
    return demo


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from app.service import Studio
    from app.settings import Settings
    from model.errors import UserError

    studio = Studio(Settings.from_env(device=args.device), checkpoint=args.checkpoint)
    print("loading the model (the first start converts the embedded model once) ...", flush=True)
    try:
        studio.model(progress=lambda stage, done, total: print(f"... {stage}", flush=True))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    demo = build_placeholder(studio)
    demo.queue(default_concurrency_limit=1)
    print(f"LCLM Studio at http://{args.host}:{args.port}", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
