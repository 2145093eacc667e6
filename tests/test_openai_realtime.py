"""``GET /v1/realtime`` on ``serve-openai``: live transcription sessions driven by the official ``openai`` client's
realtime connection (``client.realtime.connect``), tiny checkpoint on the local torch-fast engine (and one test
through Triton with ``--triton``).

Each turn's ``completed`` text equals ``transcribe`` of the turn's samples (the span the VAD events name); deltas come
while a turn is spoken and only add words; commits without VAD work; 16 sessions at once each get their own text
and a 17th is refused; every bad event gets an ``error`` event while the session goes on; a client that leaves
mid-turn stops its decoding (counted by the engine)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import boost_token, make_clip, needs_server, running_server, wait_for_counts
from test_openai_support import openai_server

from canary_qwen.backends.fast_torch import FastTorchBackend
from canary_qwen.model.synthetic import make_checkpoint

openai = pytest.importorskip("openai")
pytest.importorskip("websockets")
RATE = 16000
INTERVAL_S = 0.3
MAX_BUFFER_S = 10
MAX_SESSIONS = 16
ENDED = "canary_qwen_openai_engine_requests_ended_total"


def pcm16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")


def heard(pcm: np.ndarray) -> np.ndarray:
    """What the server decodes from 16-bit PCM."""
    return pcm.astype(np.float32) / 32768.0


def utterances(*clips: np.ndarray, gap_s: float = 1.5) -> np.ndarray:
    """Clips with ``gap_s`` of silence between them, 0.5 s before and 1 s after, as 16-bit PCM."""
    gap = np.zeros(int(gap_s * RATE), np.float32)
    parts = [np.zeros(RATE // 2, np.float32)]
    for clip in clips:
        parts += [clip, gap]
    parts[-1] = np.zeros(RATE, np.float32)
    return pcm16(np.concatenate(parts))


class Live:
    """One session through the official client: events collected by a reader thread."""

    def __init__(self, server, *, rate: int = RATE, turn_detection: object = "server_vad"):
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        self.manager = client.realtime.connect(extra_query={"intent": "transcription"}, max_retries=0)
        self.conn = self.manager.enter()
        self.events: list[dict] = []
        self.arrived = threading.Condition()
        self.closed = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.wait_for("session.created")
        audio_input: dict = {"format": {"type": "audio/pcm", "rate": rate}}
        if turn_detection is None:
            audio_input["turn_detection"] = None
        self.send({"type": "session.update", "session": {"type": "transcription", "audio": {"input": audio_input}}})
        self.wait_for("session.updated")

    def _read(self) -> None:
        try:
            while True:
                event = json.loads(self.conn.recv_bytes())
                with self.arrived:
                    self.events.append(event)
                    self.arrived.notify_all()
        except Exception:
            with self.arrived:
                self.closed = True
                self.arrived.notify_all()

    def send(self, event: dict) -> None:
        self.conn.send(event)

    def append(self, pcm: np.ndarray) -> None:
        self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm.tobytes()).decode()})

    def play(self, pcm: np.ndarray, speed: float = 1.0, chunk_ms: int = 100) -> None:
        chunk, start = RATE * chunk_ms // 1000, time.monotonic()
        for i in range(0, len(pcm), chunk):
            delay = start + i / RATE / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.append(pcm[i : i + chunk])

    def of(self, kind: str) -> list[dict]:
        with self.arrived:
            return [e for e in self.events if e["type"] == kind]

    def wait_for(self, kind: str, count: int = 1, timeout: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while len([e for e in self.events if e["type"] == kind]) < count:
                left = deadline - time.monotonic()
                assert left > 0 and not self.closed, (
                    f"{kind} x{count} not received; got {[e['type'] for e in self.events]}"
                )
                self.arrived.wait(left)
            return [e for e in self.events if e["type"] == kind]

    def close(self) -> None:
        self.manager.__exit__(None, None, None)
        self.reader.join(10)


COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("realtime")


@pytest.fixture(scope="module")
def server(tiny_checkpoint, work):
    args = ["--model", str(tiny_checkpoint), "--backend", "torch-fast", "--max-batch", "16"]
    args += ["--partial-interval-s", str(INTERVAL_S), "--max-sessions", str(MAX_SESSIONS)]
    args += ["--max-buffer-s", str(MAX_BUFFER_S), "--max-message-kb", "512"]
    with openai_server(args, work / "server") as s:
        yield s


@pytest.fixture(scope="module")
def local(tiny_checkpoint):
    return FastTorchBackend(str(tiny_checkpoint))


def turn_texts(local, pcm: np.ndarray, session: Live, items: int, offset: int = 0) -> tuple[list[str], list[str]]:
    """(the completed texts, ``transcribe`` of each turn's samples as the VAD events bound them), by item; ``pcm``
    began ``offset`` samples into the session."""
    completed = {e["item_id"]: e["transcript"] for e in session.wait_for(COMPLETED, items)}
    starts = {e["item_id"]: e["audio_start_ms"] for e in session.of("input_audio_buffer.speech_started")}
    stops = {e["item_id"]: e["audio_end_ms"] for e in session.of("input_audio_buffer.speech_stopped")}
    order = [e["item_id"] for e in session.of("input_audio_buffer.committed")]
    samples = heard(pcm)
    spans = [samples[starts[i] * RATE // 1000 - offset : stops[i] * RATE // 1000 - offset] for i in order]
    return [completed[i] for i in order], [t.text for t in local.transcribe(spans)]


def test_two_utterances_give_two_items_with_transcribes_text(server, local):
    pcm = utterances(make_clip(2.0, 1), make_clip(1.6, 2))
    session = Live(server)
    try:
        session.play(pcm)
        got, want = turn_texts(local, pcm, session, 2)
    finally:
        session.close()
    assert len(got) == 2 and got == want
    committed = session.of("input_audio_buffer.committed")
    assert committed[1]["previous_item_id"] == committed[0]["item_id"]


def test_turn_detection_changed_mid_session_keeps_session_time(server, local):
    """A second utterance after session.update changes the VAD's silence length: its span is still counted from the
    session's start, and its text is transcribe's for that span."""
    first, second = utterances(make_clip(1.2, 13)), utterances(make_clip(1.4, 14))
    session = Live(server)
    try:
        session.play(first, speed=4.0)
        session.wait_for(COMPLETED)
        vad = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 200, "silence_duration_ms": 300}
        session.send({"type": "session.update", "session": {"type": "transcription",
                      "audio": {"input": {"turn_detection": vad}}}})  # fmt: skip
        session.wait_for("session.updated", 2)
        session.play(second, speed=4.0)
        got, want = turn_texts(local, np.concatenate((first, second)), session, 2)
    finally:
        session.close()
    assert got == want


def test_openais_default_24_khz_input_is_transcribed(server):
    pcm16k = utterances(make_clip(1.8, 3))
    import soxr

    pcm = pcm16(soxr.resample(heard(pcm16k), RATE, 24000))
    session = Live(server, rate=24000)
    try:
        session.play(pcm, speed=2.0)
        (done,) = session.wait_for(COMPLETED)
    finally:
        session.close()
    assert done["transcript"] and done["usage"]["type"] == "duration"


def test_commit_without_vad(server, local):
    session = Live(server, turn_detection=None)
    try:
        session.send({"type": "input_audio_buffer.commit"})
        (empty,) = session.wait_for("error")
        assert empty["error"]["code"] == "input_audio_buffer_commit_empty"
        pcm = pcm16(make_clip(1.4, 4))
        session.play(pcm, speed=4.0)
        session.send({"type": "input_audio_buffer.commit"})
        (done,) = session.wait_for(COMPLETED)
        assert not session.of("input_audio_buffer.speech_started")  # no VAD: the client's commit made the turn
        assert done["transcript"] == local.transcribe([heard(pcm)])[0].text
        session.append(pcm16(make_clip(0.5, 5)))
        session.send({"type": "input_audio_buffer.clear"})
        session.wait_for("input_audio_buffer.cleared")
    finally:
        session.close()


@pytest.fixture(scope="module")
def steady_checkpoint(tmp_path_factory):
    """A tiny checkpoint whose answer barely depends on the audio (projection zeroed, one word boosted): its
    re-decodes of a growing turn agree, so LocalAgreement has words to send (random weights agree by chance only)."""
    from safetensors.torch import load_file, save_file

    ckpt = make_checkpoint(tmp_path_factory.mktemp("steady") / "ckpt", "tiny", seed=0)
    tensors = load_file(ckpt / "model.safetensors")
    for name in tensors:
        if name.startswith("perception.proj."):
            tensors[name].zero_()
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    return boost_token(ckpt, "Ġsent", 25.0)


def test_deltas_come_while_a_turn_is_spoken_and_only_add_words(steady_checkpoint, work):
    args = ["--model", str(steady_checkpoint), "--backend", "torch-fast", "--partial-interval-s", str(INTERVAL_S)]
    with openai_server(args + ["--max-new-tokens", "24"], work / "steady") as server:
        session = Live(server)
        try:
            session.play(utterances(make_clip(3.0, 6)))
            (done,) = session.wait_for(COMPLETED)
        finally:
            session.close()
    kinds = [e["type"] for e in session.events]
    assert DELTA in kinds and kinds.index(DELTA) < kinds.index("input_audio_buffer.speech_stopped")
    deltas = [e["delta"] for e in session.of(DELTA)]
    assert all(d.startswith(" ") for d in deltas[1:])  # each adds whole words after the ones shown
    assert "".join(deltas).split() and done["transcript"]


def test_sixteen_sessions_each_get_their_own_text_and_one_more_is_refused(server, local):
    clips = [make_clip(1.0 + 0.1 * i, 20 + i) for i in range(MAX_SESSIONS)]
    sessions = [Live(server) for _ in range(MAX_SESSIONS)]
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        with client.realtime.connect(extra_query={"intent": "transcription"}, max_retries=0) as extra:
            refusal = json.loads(extra.recv_bytes())
        assert refusal["type"] == "error" and refusal["error"]["code"] == "too_many_sessions"
        pcms = [utterances(c) for c in clips]
        players = [threading.Thread(target=s.play, args=(p, 4.0)) for s, p in zip(sessions, pcms)]
        for p in players:
            p.start()
        for p in players:
            p.join(120)
        for session, pcm in zip(sessions, pcms):
            got, want = turn_texts(local, pcm, session, 1)
            assert got == want
    finally:
        for s in sessions:
            s.close()
    assert len({tuple(turn_texts(local, p, s, 1)[0]) for s, p in zip(sessions, pcms)}) > 1


def test_bad_events_get_error_events_and_the_session_goes_on(server, local):
    session = Live(server)
    try:
        bad = [
            ({"type": "input_audio_buffer.append", "audio": "%%% not base64"}, "invalid_audio"),
            (
                {"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01\x02\x03").decode()},
                "invalid_audio",
            ),
            ({"type": "response.create"}, "invalid_event"),
            (
                {
                    "type": "session.update",
                    "session": {
                        "type": "transcription",
                        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 8000}}},
                    },
                },
                "unsupported_format",
            ),  # fmt: skip
            (
                {
                    "type": "session.update",
                    "session": {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}}}},
                },
                "unsupported_format",
            ),  # fmt: skip
            ({"type": "session.update", "session": {"type": "realtime"}}, "unsupported_value"),
            (
                {
                    "type": "input_audio_buffer.append",
                    "audio": base64.b64encode(
                        pcm16(np.zeros(20 * RATE, np.float32)).tobytes()  # 853 KB of base64
                    ).decode(),
                },
                "message_too_large",
            ),  # fmt: skip
        ]
        for event, code in bad:
            before = len(session.of("error"))
            session.send(event)
            errors = session.wait_for("error", before + 1)
            assert errors[-1]["error"]["code"] == code, (event["type"], errors[-1])
        # audio past the buffer limit, sent in appends under the message limit
        quiet_loud = pcm16(0.3 * np.ones(RATE * 2, np.float32))  # one long turn that never pauses
        before = len(session.of("error"))
        for _ in range(MAX_BUFFER_S // 2 + 1):
            session.append(quiet_loud)
        assert session.wait_for("error", before + 1)[-1]["error"]["code"] == "buffer_full"
        accepted = MAX_BUFFER_S * RATE  # the appends up to the limit; the one past it was dropped
        session.send({"type": "input_audio_buffer.clear"})
        session.wait_for("input_audio_buffer.cleared")
        pcm = utterances(make_clip(1.2, 7))
        session.play(pcm, speed=4.0)
        got, want = turn_texts(local, pcm, session, 1, offset=accepted)
        assert got == want  # the session went on
    finally:
        session.close()


def test_a_client_that_leaves_mid_turn_stops_its_decoding(server):
    """Commit a turn and leave at once: the engine ends its decode as cancelled, none finished (counted by it)."""
    counts = lambda: {o: server.metric(ENDED, f'{{outcome="{o}"}}') for o in ("finished", "cancelled")}  # noqa: E731
    before = counts()
    session = Live(server, turn_detection=None)
    session.append(pcm16(make_clip(6.0, 8)))
    session.send({"type": "input_audio_buffer.commit"})
    session.wait_for("input_audio_buffer.committed")
    session.close()
    after = wait_for_counts(counts, lambda c: c["cancelled"] >= before["cancelled"] + 1)
    time.sleep(1.0)
    assert counts()["finished"] == before["finished"] == after["finished"]


def test_an_idle_session_is_closed(tiny_checkpoint, work):
    args = ["--model", str(tiny_checkpoint), "--backend", "torch-fast", "--session-idle-s", "1"]
    with openai_server(args, work / "idle") as server:
        session = Live(server)
        try:
            (error,) = session.wait_for("error", timeout=10)
            assert error["error"]["code"] == "idle_timeout"
        finally:
            session.close()


def test_client_live_prints_each_turns_text(server, local, tmp_path):
    pcm = utterances(make_clip(1.5, 9), make_clip(1.2, 10))
    path = tmp_path / "two.wav"
    sf.write(path, heard(pcm), RATE, subtype="PCM_16")
    command = [sys.executable, "-m", "canary_qwen.cli", "client", "live", "--openai", server.url, "--speed", "4"]
    run = subprocess.run([*command, "--json", str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    events = [json.loads(line) for line in run.stdout.splitlines()]
    starts = [e["audio_start_ms"] for e in events if e["type"] == "input_audio_buffer.speech_started"]
    stops = [e["audio_end_ms"] for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    spans = [heard(pcm)[a * RATE // 1000 : b * RATE // 1000] for a, b in zip(starts, stops)]
    assert [e["transcript"] for e in events if e["type"] == COMPLETED] == [t.text for t in local.transcribe(spans)]
    plain = subprocess.run([*command, str(path)], capture_output=True, timeout=120)  # bytes: the texts hold \r
    want = "".join(f"{path}\t{t.text}\n" for t in local.transcribe(spans))
    assert plain.returncode == 0 and plain.stdout.decode() == want


@needs_server
def test_through_triton(tiny_checkpoint, work, local):
    """`serve-openai --triton`: each re-decode and each turn is a request to the bundled Triton server."""
    from canary_qwen.serving.engine_flavor import generate_engine_repo

    repo = generate_engine_repo("torch-fast", tiny_checkpoint, work / "repo", max_batch=8)
    with running_server(repo, work / "triton") as triton:
        args = ["--triton", f"grpc://{triton.grpc_url}", "--partial-interval-s", str(INTERVAL_S)]
        with openai_server(args, work / "over-triton") as server:
            pcm = utterances(make_clip(1.7, 11), make_clip(1.1, 12))
            session = Live(server)
            try:
                session.play(pcm, speed=2.0)
                got, want = turn_texts(local, pcm, session, 2)
            finally:
                session.close()
    assert got == want
