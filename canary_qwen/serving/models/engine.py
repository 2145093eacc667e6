"""Triton python model ``engine``: one in-process engine (parameter ``engine``: torch-fast or vllm) for every
request (decoupled).

AUDIO + PROMPT (optional) + MAX_NEW_TOKENS (optional) -> a stream of responses, each with the TEXT piece and
the OUTPUT_IDS its tokens added (and PROMPT_TOKENS, the prompt's length), then the final flag; the pieces join to
the transcription's text. A request with the parameter ``whole_answer`` true gets the whole answer (or its
error) as its one response (the ``canary_qwen`` gather model asks so: each response is a round trip between processes). DIALOGUE (JSON
turns) in place of AUDIO is answered in LLM mode (the LoRA off) by the same engine, in the same batch.

``execute`` only checks a request and submits it to the ``EngineLoop``, whose thread owns the engine: between
two steps it admits what arrived (one batch, encoded together; it joins the running batch), stops the requests
whose client cancelled, and sends each request's new tokens as they come. The engine is made (weights loaded,
kernels compiled) in ``initialize``, on the loop's thread: the server is not ready before it can answer.
"""

import json
import locale
import queue
import threading
import time

import triton_python_backend_utils as pb_utils

from canary_qwen.backends.engines import SOURCES, open_engine
from canary_qwen.bounds import RequestBounds
from canary_qwen.engines import EngineLoop
from canary_qwen.errors import CanaryQwenError, Overloaded
from canary_qwen.serving.checks import TextStream, model_parameters
from canary_qwen.serving.models.metrics import ModelCounters
from canary_qwen.serving.models.responses import CANCEL_CHECK_S, WHOLE_ANSWER, engine_request, piece_response

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
METRICS_PUSH_S = 0.5  # how often the engine's counts go to Triton's metrics (each push is a round trip)


class _Outbox:
    """Everything that goes back to the server process, from one thread: a response sent and an is_cancelled()
    asked are round trips to it (milliseconds each under load), which the engine's thread must not wait for
    between two decode steps. Measured at full size (int8, 16 requests in flight): with the engine thread
    sending and polling itself the engine process used ~1.6 of 2 cores. ``publish`` (the engine's counts to
    Triton's metrics, a ``ModelCounters``' push) is called before each final response, every ``METRICS_PUSH_S`` seconds,
    and at the end; every response sent is counted (``canary_qwen_responses_total``)."""

    def __init__(self, counters):
        self.counters = counters
        self.jobs = queue.Queue()
        self.open = set()  # replies not yet finished, watched for cancellation
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="engine-outbox", daemon=True)
        self.thread.start()

    def _run(self):
        next_check = time.monotonic() + CANCEL_CHECK_S
        next_push = time.monotonic() + METRICS_PUSH_S
        while not self.stopping:
            try:
                job = self.jobs.get(timeout=max(0.0, next_check - time.monotonic()))
            except queue.Empty:
                job = None
            jobs = [] if job is None else [job]
            while True:  # what else is waiting: consecutive pieces of one reply go out as one response
                try:
                    jobs.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            for job in _coalesced(j for j in jobs if j is not None):
                try:
                    job()
                except Exception:  # the client went away: nothing more goes to it
                    pass
            if time.monotonic() >= next_check:
                self._watch_cancellations()
                next_check = time.monotonic() + CANCEL_CHECK_S
            if time.monotonic() >= next_push:
                self.publish()
                next_push = time.monotonic() + METRICS_PUSH_S
        self.publish()

    def publish(self):
        self.counters.push()

    def _watch_cancellations(self):
        with self.lock:
            watched = list(self.open)
        for reply in watched:
            try:
                if reply.request.is_cancelled():
                    reply.end()
            except Exception:
                reply.end()

    def stop(self):
        self.stopping = True
        self.jobs.put(None)
        self.thread.join(10)


class _Failure:
    """A reply's error answer, as the outbox's job."""

    __slots__ = ("reply", "answer")

    def __init__(self, reply, answer):
        self.reply, self.answer = reply, answer

    def __call__(self):
        if not self.reply.gone:
            self.reply.outbox.counters.responded()
            self.reply.outbox.publish()
            self.reply.sender.send(self.answer, flags=FINAL)


class _Send:
    """A reply's next ids (and whether they end it), as the outbox's job."""

    __slots__ = ("reply", "ids", "finished")

    def __init__(self, reply, ids: list[int], finished: bool):
        self.reply, self.ids, self.finished = reply, ids, finished

    def __call__(self):
        self.reply._send(self.ids, self.finished)


def _coalesced(jobs):
    """The jobs in order, with each reply's consecutive sends merged into one: a response is a round trip to the
    server process, and when the outbox falls behind the engine (a step is faster than a send) it catches up in
    one. Other jobs (a failure) end a reply's run."""
    out: list = []
    open_send: dict = {}  # reply -> its last send in ``out``, while nothing else of that reply came after
    for job in jobs:
        reply = getattr(job, "reply", None)
        last = open_send.get(reply)
        if isinstance(job, _Send) and last is not None and not last.finished:
            last.ids += job.ids
            last.finished = job.finished
            continue
        if isinstance(job, _Send):
            open_send[reply] = job
        else:
            open_send.pop(reply, None)
        out.append(job)
    return out


class _Reply:
    """One request's sink (``canary_qwen.engines.Sink``): what the engine's thread hands it goes out through the
    outbox, piece by piece, in order; ``cancelled`` reads what the outbox found out."""

    def __init__(self, request, tokenizer, outbox, whole: bool):
        self.request = request
        self.whole = whole  # one response at the end instead of a piece per step (``WHOLE_ANSWER``)
        self.held: list[int] = []  # with ``whole``, the ids so far
        self.prompt_tokens = 0  # the request's prompt length, sent with every piece (PROMPT_TOKENS)
        self.sender = request.get_response_sender()
        self.text = TextStream(tokenizer)
        self.outbox = outbox
        self.gone = False  # the client cancelled (set by the outbox's thread)
        self.closed = False  # the final flag is out (or queued)
        self.sent_any = False
        with outbox.lock:
            outbox.open.add(self)

    def _close(self):
        self.closed = True
        with self.outbox.lock:
            self.outbox.open.discard(self)

    def send(self, ids, finished):
        if self.closed:
            return
        if self.whole:
            self.held += ids
            if not finished:
                return
            ids = self.held
        if finished:
            self._close()
        self.outbox.jobs.put(_Send(self, list(ids), finished))

    def _send(self, ids, finished):
        if self.gone:
            return
        piece = "".join(self.text.push(t) for t in ids)
        if finished:
            piece += self.text.finish()
        if piece or ids or finished:
            self.outbox.counters.responded()
        if finished:
            self.outbox.publish()  # the engine counted it before handing it over: the client sees it counted
        if piece or ids or (finished and not self.sent_any):  # a request answered with no tokens still gets one
            try:
                self.sender.send(piece_response(piece, ids, self.prompt_tokens), flags=FINAL if finished else 0)
            except Exception:
                if not finished:
                    raise
                self.sender.send(flags=FINAL)  # the client went away: the final flag all the same (see end)
            self.sent_any = True
        elif finished:
            self.sender.send(flags=FINAL)

    def fail(self, error):
        if self.closed:
            return
        self._close()
        self.outbox.jobs.put(_Failure(self, pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))))

    def end(self):
        """The client cancelled (outbox thread): no more text, but the final flag all the same, since Triton 2.51
        does not unload a decoupled model while a request of it has had none."""
        if self.closed:  # its last response is queued already and goes out with the final flag
            return
        self.gone = True
        self._close()
        self.outbox.counters.responded()
        self.sender.send(flags=FINAL)

    def cancelled(self):
        return self.gone


class TritonPythonModel:
    def initialize(self, args):
        config, params, version_dir = model_parameters(args)
        self.name = config["name"]
        # The stub's embedded Python starts with LC_CTYPE "C": files opened without an encoding would read as
        # ASCII, and importing vLLM or torch's compiler reads non-ASCII kernel templates that way.
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        kind = params["engine"]
        self.bounds = RequestBounds.from_parameters(params)
        source = version_dir / SOURCES[kind]
        self.loop = EngineLoop(
            lambda: open_engine(
                kind,
                str(source),
                device=params.get("device", "cpu"),
                dtype=params.get("dtype") or None,
                max_batch=int(config["max_batch_size"]),
                bounds=self.bounds,
                kv_cache_gib=float(params.get("kv_cache_gib", "1")),
            ),
            name=f"{self.name} ({kind})",
            max_pending=int(params["max_pending"]),
        )
        self.counters = ModelCounters(self.name, self.loop.counts, lambda: self.loop.pending)
        self.outbox = _Outbox(self.counters)
        self.tokenizer = self.loop.tokenizer

    def execute(self, requests):
        for request in requests:
            whole = json.loads(request.parameters()).get(WHOLE_ANSWER, False)
            reply = _Reply(request, self.tokenizer, self.outbox, whole)
            try:
                samples, ids, budget = engine_request(request, self.name, self.tokenizer, self.bounds)
                reply.prompt_tokens = len(ids)
                self.loop.submit(ids, samples, budget, reply)
            except Overloaded as e:  # in Triton's words for a full queue, which clients read as busy
                reply.fail(f"Exceeds maximum queue size: {e}")
            except CanaryQwenError as e:
                reply.fail(e)
        return None

    def finalize(self):
        self.loop.close()
        self.outbox.stop()
        self.counters.close()
