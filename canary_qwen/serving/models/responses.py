"""One response per request for the python models that handle requests one at a time (imported only
inside Triton's python stub, like the model files)."""

import traceback

import triton_python_backend_utils as pb_utils

from canary_qwen.errors import InputError


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
