"""``canary-qwen demo``: the whole deployment on the embedded CPU default, end to end.

checkpoint (a random tiny one unless ``--model``) -> export -> Triton model repository (onnx
flavour) -> the bundled Triton server -> the client transcribes a spoken clip made with espeak-ng
-> text and RTFx. With random weights the text is meaningless but must equal the local backend's.
"""

from __future__ import annotations

import time
from pathlib import Path

from .defaults import SAMPLE_RATE

DEMO_SENTENCE = "The quick brown fox jumps over the lazy dog while the model writes down what it hears."


def _step(message: str) -> None:
    print(f"==> {message}", flush=True)


def _printable(text: str) -> str:
    """Control characters escaped (random weights produce them) so the terminal shows the text as it is."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def run_demo(args) -> int:
    from .backends.onnx_runtime import OnnxBackend
    from .client.triton import TritonClient
    from .export.artifacts import export_all
    from .model.synthetic import make_checkpoint
    from .pipeline.audio import load_audio
    from .pipeline.speech_clip import synthesize_speech
    from .serving.onnx_flavor import generate_onnx_repo
    from .serving.server import TritonServer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = str(work / "checkpoint")
        _step(f"writing a random tiny checkpoint to {model} (pass --model for real weights)")
        make_checkpoint(Path(model), "tiny", seed=0)
    _step(f"exporting {model} to ONNX")
    manifest = export_all(model, work / "export")
    _step("generating the Triton model repository (onnx flavour)")
    repo = generate_onnx_repo(manifest.root, work / "triton_repo")
    if args.audio:
        clip_path = Path(args.audio)
    else:
        clip_path = work / "speech.wav"
        _step(f"speaking {args.text!r} with espeak-ng into {clip_path}")
        synthesize_speech(args.text, clip_path)
    audio = load_audio(clip_path)
    seconds = len(audio) / SAMPLE_RATE
    local = OnnxBackend(manifest.root).transcribe([audio])[0].text
    _step("starting the bundled Triton server")
    with TritonServer(repo) as server:
        print(f"    HTTP {server.http_url}   gRPC {server.grpc_url}")
        client = TritonClient(server.grpc_url, protocol="grpc")
        client.transcribe(audio)  # warm-up: first request loads the sessions
        start = time.perf_counter()
        text = client.transcribe(audio)
        wall = time.perf_counter() - start
        pieces = list(client.stream(audio))
        client.close()
    print(f"\naudio:     {clip_path} ({seconds:.2f} s)")
    print(f"text:      {_printable(text)}")
    print(f"streamed:  {''.join(pieces)!r} in {len(pieces)} pieces")
    print(f"RTFx:      {seconds / wall:.1f} (one request through Triton, {wall * 1000:.0f} ms)")
    same = text == local == "".join(pieces).strip()
    print(f"matches the local ONNX Runtime backend: {'yes' if same else 'NO'}")
    return 0 if same else 1
