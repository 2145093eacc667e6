"""Responses of the python models (imported only inside Triton's python stub, like the model files): one response
per request for the models that handle requests one at a time, and the pieces of a streaming request."""

import time
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.bounds import RequestBounds
from canary_qwen.engines import CANCELLED, FAILED, FINISHED
from canary_qwen.errors import InputError
from canary_qwen.model.prompt import dialogue_ids
from canary_qwen.modes import LLM
from canary_qwen.serving.checks import (
    TextStream,
    check_audio,
    encode_prompt,
    read_budgets,
    read_dialogue,
    read_strings,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_S = 0.05  # is_cancelled() is a round trip to the server process: ask a few times a second per stream
WHOLE_ANSWER = "whole_answer"  # request parameter: the engine model answers in one final response, not piece by piece


def respond_each(requests, handle, name: str):
    """``handle(request) -> InferenceResponse`` for each request; a refused request (InputError) gets its
    message back, any other failure a short error (the traceback goes to the server log), and the
    model keeps serving."""
    responses = []
    for request in requests:
        try:
            responses.append(handle(request))
        except InputError as e:
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        except Exception as e:
            pb_utils.Logger.log_error(f"{name}: {traceback.format_exc()}")
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{name} failed: {e}")))
    return responses


def piece_response(piece: str, ids: list[int], prompt_tokens: int | None = None):
    """One response of a stream: a TEXT piece and the OUTPUT_IDS of the tokens that made it; with ``prompt_tokens``
    also PROMPT_TOKENS (the engine models: the request's prompt length, for an API's usage)."""
    tensors = [
        pb_utils.Tensor("TEXT", np.array([[piece.encode("utf-8")]], dtype=object)),
        pb_utils.Tensor("OUTPUT_IDS", np.array([ids], dtype=np.int64)),
    ]
    if prompt_tokens is not None:
        tensors.append(pb_utils.Tensor("PROMPT_TOKENS", np.array([[prompt_tokens]], dtype=np.int64)))
    return pb_utils.InferenceResponse(tensors)


def one_clip_request(request, name, tokenizer, bounds: RequestBounds, least_budget: int = 1):
    """A streaming request's (samples [S], prompt ids, budget), checked against ``bounds``; InputError when it is
    refused."""
    audio = check_audio(pb_utils.get_input_tensor_by_name(request, "AUDIO").as_numpy(), bounds.audio_s)
    if len(audio) != 1:
        raise InputError(f"{name} takes one clip per request, got a batch of {len(audio)}")
    prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT")
    prompt = read_strings(None if prompt is None else prompt.as_numpy(), 1)[0]
    budget = pb_utils.get_input_tensor_by_name(request, "MAX_NEW_TOKENS")
    (budget,) = read_budgets(None if budget is None else budget.as_numpy(), 1, bounds, least_budget)
    return audio[0], encode_prompt(tokenizer, prompt), budget


def engine_request(request, name, tokenizer, bounds: RequestBounds):
    """An engine model's request as (samples [S] or None, prompt ids, budget): a clip (AUDIO, PROMPT), or a text-only
    dialogue (DIALOGUE, LLM mode: samples None), each within its mode's bounds; InputError when it is refused."""
    dialogue = pb_utils.get_input_tensor_by_name(request, "DIALOGUE")
    if dialogue is None:
        if pb_utils.get_input_tensor_by_name(request, "AUDIO") is None:
            raise InputError(f"{name} takes AUDIO (transcription) or DIALOGUE (LLM mode); the request has neither")
        return one_clip_request(request, name, tokenizer, bounds, 0)
    if pb_utils.get_input_tensor_by_name(request, "AUDIO") is not None:
        raise InputError(f"{name} takes AUDIO or DIALOGUE, not both: send the audio's transcript in the dialogue")
    (text,) = read_strings(dialogue.as_numpy(), 1, "DIALOGUE")
    ids = dialogue_ids(tokenizer, read_dialogue(text or ""))
    bounds.check_dialogue(len(ids))
    budget = pb_utils.get_input_tensor_by_name(request, "MAX_NEW_TOKENS")
    (budget,) = read_budgets(None if budget is None else budget.as_numpy(), 1, bounds, least=0, mode=LLM)
    return None, ids, budget


class TextReply:
    """The responses of one decoupled request that streams TEXT pieces and their OUTPUT_IDS (``canary_qwen_stream``):
    its sender, where its text stands, whether it is closed (final flag sent) or its client cancelled. How it
    closed, and its tokens, go to the model's ``counters`` (a ``ModelCounters``) before the final flag does."""

    def __init__(self, request, tokenizer, counters):
        self.request = request
        self.sender = request.get_response_sender()
        self.text = TextStream(tokenizer)
        self.unsent: list[int] = []  # ids whose text is held back (whitespace, an incomplete character)
        self.counters = counters
        self.closed = False
        self.next_check = 0.0

    def _close(self, outcome: str) -> None:
        self.closed = True
        self.counters.ended(outcome, len(self.text.ids))

    def cancelled(self) -> bool:
        now = time.monotonic()
        if now < self.next_check:
            return False
        self.next_check = now + CANCEL_CHECK_S
        return self.request.is_cancelled()

    def push(self, token: int) -> None:
        """One new token: its text piece goes out as soon as there is one, with the ids that made it."""
        self.unsent.append(int(token))
        self.send(self.text.push(token))

    def send(self, piece: str, final: bool = False) -> None:
        if self.closed:
            return
        response = None
        if piece or (final and self.unsent):
            response, self.unsent = piece_response(piece, self.unsent), []
        if response is None and not final:
            return
        self.counters.responded()
        if final:  # the whole answer is made: counted before the client hears of it
            self._close(FINISHED)
        try:
            self.sender.send(response, flags=FINAL if final else 0)
        except Exception:  # the client went away between our checks: nothing more goes to it
            if final:
                self._final_flag()
            else:
                self.end()

    def finish(self) -> None:
        """The held-back tail of the text, with the final flag."""
        self.send(self.text.finish(), final=True)

    def end(self) -> None:
        """Close the request without more text (its client cancelled or went away). The final flag must go out
        all the same: Triton 2.51 does not unload a decoupled model while a request of it has had none."""
        if self.closed:
            return
        self.counters.responded()
        self._close(CANCELLED)
        self._final_flag()

    def _final_flag(self) -> None:
        try:
            self.sender.send(flags=FINAL)
        except Exception:
            pass

    def fail(self, message: str) -> None:
        """An error response closing the request (unless it is closed already). Never raises: a caller failing
        several requests in turn must reach every one of them, also after one whose client has gone."""
        if self.closed:
            return
        self.counters.responded()
        self._close(FAILED)
        try:
            self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
        except Exception:
            pass
