"""SCAL-SDT web app entry point."""
import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description="SCAL-SDT web app")
    parser.add_argument("--listen", action="store_true", help="bind 0.0.0.0 instead of 127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    import gradio as gr

    with gr.Blocks(title="SCAL-SDT") as demo:
        gr.Markdown("# SCAL-SDT")
    demo.launch(server_name="0.0.0.0" if args.listen else "127.0.0.1", server_port=args.port)


if __name__ == "__main__":
    main()
