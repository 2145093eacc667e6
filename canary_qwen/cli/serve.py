"""``canary-qwen serve``: the Triton server bundled in nvidia-pytriton on a model repository, restarted after faults."""

from __future__ import annotations

from ..serving.server import DEAD_STUB_EXIT
from ..serving.supervisor import STATUS_FILE, RestartPolicy


def add_serve(sub) -> None:
    defaults = RestartPolicy()
    p = sub.add_parser(
        "serve",
        help="serve a model repository with the Triton server bundled in nvidia-pytriton",
        description="Start the tritonserver binary from the nvidia-pytriton wheel (python backend) on a model "
        "repository, print its HTTP/gRPC/metrics endpoints, and stop it cleanly on Ctrl-C or SIGTERM. "
        "Ports are picked free unless given. When a model's python process dies or tritonserver exits, the "
        "server is stopped (requests in flight get an error) and started again on the same ports, each restart "
        "printed with its cause; the k-th restart within the window waits 2^(k-1) s first (at most 30 s). "
        f"Beyond --max-restarts within --restart-window-s, or with --no-restart, serve exits: code {DEAD_STUB_EXIT} after a dead "
        f"model process, 1 after tritonserver exited or did not start again. The work folder (printed at start; "
        f"--work-dir) holds tritonserver.log and {STATUS_FILE}: state, restart count, last cause and time, recent "
        "restarts with their downtime. For the trt flavour use the NGC Triton + TensorRT-LLM container instead.",
    )
    p.add_argument("--repo", required=True, help="model repository (from `canary-qwen triton-repo`)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 for other machines)"
    )
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--grpc-port", type=int, default=None)
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument(
        "--work-dir",
        default=None,
        metavar="DIR",
        help=f"folder for tritonserver.log and {STATUS_FILE} (default: a new temporary folder)",
    )
    p.add_argument(
        "--no-restart",
        action="store_true",
        help="exit at the first fault instead of restarting (for systemd, Kubernetes and other supervisors)",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=defaults.max_restarts,
        metavar="N",
        help=f"restarts allowed within the window before serve gives up (default: {defaults.max_restarts})",
    )
    p.add_argument(
        "--restart-window-s",
        type=float,
        default=defaults.window_s,
        metavar="S",
        help=f"the window --max-restarts counts in, seconds (default: {defaults.window_s:g})",
    )
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    from ..serving.supervisor import serve_forever

    return serve_forever(
        args.repo,
        restart=not args.no_restart,
        policy=RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window_s),
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        work_dir=args.work_dir,
    )
