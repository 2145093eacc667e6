"""``canary-qwen serve``: the Triton server bundled in nvidia-pytriton on a model repository."""

from __future__ import annotations


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model repository with the Triton server bundled in nvidia-pytriton",
        description="Start the tritonserver binary from the nvidia-pytriton wheel (python backend) on a model "
        "repository, print its HTTP/gRPC/metrics endpoints, and stop it cleanly on Ctrl-C or SIGTERM. "
        "Ports are picked free unless given. For the trt flavour use the NGC Triton + TensorRT-LLM container instead.",
    )
    p.add_argument("--repo", required=True, help="model repository (from `canary-qwen triton-repo`)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 for other machines)"
    )
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--grpc-port", type=int, default=None)
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument("--log-verbose", type=int, default=0)
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    from ..serving.server import serve_forever

    return serve_forever(
        args.repo,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
    )
