"""`python app.py`: command-line flags, the checks that keep a public link closed, and the launch.

Gradio and the page load only after the flags are checked, so a refused start is immediate.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Optional

AUTH_ENV = "SCAL_AUTH"
OUTPUT_ENV = "SCAL_SDT_OUTPUT"
DEFAULT_PORT = 7860
PORT_TRIES = 100
# datasets.MAX_UPLOAD_BYTES in MiB (not imported: it would load numpy before the flags are checked)
DEFAULT_MAX_UPLOAD_MB = 20480
OPEN_NETWORK_WARNING = ("--listen without a login: anyone on the network can start jobs and read and write files "
                        f"as this user. Give a login with --auth USER:PASS or {AUTH_ENV}=USER:PASS.")


class LaunchError(Exception):
    """A flag combination the app refuses to start with."""


def port_number(text: str) -> int:
    """--port's type: argparse prints the refusal as one error line instead of a socket error's traceback."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {port}")
    return port


def megabytes(text: str) -> int:
    """--max-upload-mb's type: a whole number of MiB, at least 1."""
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of megabytes, got {text!r}") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 megabyte, got {size}")
    return size


def folder(text: str) -> str:
    """--model-dir's and --allow-path's type: an existing folder, so that a typo does not silently allow nothing."""
    if not os.path.isdir(os.path.expanduser(text)):
        raise argparse.ArgumentTypeError(f"not a folder: {text}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python app.py", description="SCAL-SDT web app")
    parser.add_argument("--listen", action="store_true", help="bind 0.0.0.0 (the local network) instead of 127.0.0.1")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help=f"port to serve on (default {DEFAULT_PORT}; the next free one when taken)")
    parser.add_argument("--share", action="store_true",
                        help=f"open a public Gradio link; needs --auth or the {AUTH_ENV} environment variable")
    parser.add_argument("--auth", metavar="USER:PASS", help=f"require this login (also read from {AUTH_ENV})")
    parser.add_argument("--inbrowser", action="store_true", help="open the page in the default browser")
    parser.add_argument("--output-dir", metavar="DIR",
                        help=f"output folder for runs, replacing the presets' (also read from {OUTPUT_ENV})")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="folder of the datasets uploaded on the Dataset tab (default "
                             "$XDG_DATA_HOME/scal-sdt/datasets, that is ~/.local/share/scal-sdt/datasets); the run "
                             "queue is kept beside it, in scal-sdt-queue.json")
    parser.add_argument("--model-dir", metavar="DIR", type=folder, action="append", default=[],
                        help="with --listen or --share: a folder of models the page may read (repeatable)")
    parser.add_argument("--allow-path", metavar="DIR", type=folder, action="append", default=[],
                        help="with --listen or --share: another folder the page may read and write (repeatable); "
                             "by default only the data, output, model and cache folders")
    parser.add_argument("--max-upload-mb", metavar="N", type=megabytes, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest upload, and largest file offered for download, in MiB "
                             f"(default {DEFAULT_MAX_UPLOAD_MB})")
    return parser


def parse_auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise LaunchError("--auth / SCAL_AUTH: expected USER:PASS")
    return user, password


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the server will: a port left in TIME_WAIT by a previous run counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str, start: int, tries: int = PORT_TRIES) -> int:
    for port in range(start, min(start + tries, 65536)):
        if port_is_free(host, port):
            return port
    raise LaunchError(f"--port: no free port in {start}-{start + tries - 1}")


def launch_options(args: argparse.Namespace, env: Optional[dict] = None) -> dict:
    """gradio's launch() arguments for the flags; raises LaunchError for a combination that is refused."""
    env = os.environ if env is None else env
    auth_text = args.auth or env.get(AUTH_ENV)
    auth = parse_auth(auth_text) if auth_text else None
    if args.share and auth is None:
        raise LaunchError(f"--share opens a public link: give a login with --auth USER:PASS or {AUTH_ENV}=USER:PASS")
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    return {"server_name": host, "server_port": pick_port(host, args.port), "share": args.share, "auth": auth,
            "inbrowser": args.inbrowser, "max_file_size": args.max_upload_mb * 2**20}


def path_policy(args: argparse.Namespace, output_dir: Optional[str]):
    """Where the page may read and write: its own folders when served to others, anywhere for a local app."""
    from .allowed import PathPolicy
    from .datasets import default_data_dir

    if not (args.listen or args.share):
        return PathPolicy.local()
    return PathPolicy.shared(Path(args.data_dir) if args.data_dir else default_data_dir(), output_dir,
                             args.model_dir, args.allow_path)


def open_network_warning(options: dict) -> Optional[str]:
    """The warning for a page served to the network with no login (a public link always has one)."""
    return OPEN_NETWORK_WARNING if options["server_name"] == "0.0.0.0" and options["auth"] is None else None


def open_queue(manager, data_dir: Optional[str]):
    """The run queue kept beside the data folder, as the previous app process left it, going on: a run that
    process was training resumes from its newest checkpoint, then the queued jobs follow."""
    from .job_kinds import KINDS
    from .run_queue import RunQueue, queue_file

    run_queue = RunQueue(manager, queue_file(data_dir), KINDS)
    if run_queue.warning:
        print(f"warning: {run_queue.warning}", file=sys.stderr)
    run_queue.restart()
    return run_queue


def main(argv: Optional[list[str]] = None) -> int:
    from engine import allocator

    allocator.keep_freed_memory()  # before any thread starts: see engine.allocator
    args = build_parser().parse_args(argv)
    try:
        options = launch_options(args)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    warning = open_network_warning(options)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from .jobs import JobManager
    from .live import CSS
    from .page import build_page

    output_dir = args.output_dir or os.environ.get(OUTPUT_ENV)
    manager = JobManager()
    page = build_page(manager=manager, output_dir=output_dir, warning=warning, data_dir=args.data_dir,
                      policy=path_policy(args, output_dir), max_upload_bytes=options["max_file_size"],
                      run_queue=open_queue(manager, args.data_dir))
    page.queue(default_concurrency_limit=4)
    page.launch(**options, css=CSS, footer_links=["api", "settings"], show_error=True)
    return 0
