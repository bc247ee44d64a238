"""vLLM backend: an in-process ``vllm.LLM`` engine for batch annotation on a GPU.

- The engine is built once with ``enable_prefix_caching=True`` (the rubric shared by every prompt is
  computed once and its KV blocks reused) and ``max_model_len=cfg.n_ctx``.
- A batch goes through one ``LLM.chat`` call (the model's chat template, each prompt as the user
  message), temperature 0, ``max_tokens=cfg.max_tokens``, ``logprobs=5`` and guided decoding of
  :data:`GRADE_SCHEMA` (``StructuredOutputsParams`` in recent vLLM, ``GuidedDecodingParams`` before).
- Latency per prompt is the batch's wall time divided by its size.
- If the batch call raises, each prompt is retried alone so one bad prompt (too long, say) fails
  only itself.

Importable only where vLLM is installed: ``pip install 'assay[gpu]'``.
"""

from __future__ import annotations

import logging
import time

from assay.annotate.backends import GRADE_SCHEMA, Completion
from assay.store import redact_text
from assay.annotate.parse import grade_token_logprobs

log = logging.getLogger(__name__)

try:
    import vllm
except ImportError as e:  # pragma: no cover - GPU machines only
    raise ImportError("the 'vllm' backend needs vLLM and a CUDA GPU: pip install 'assay[gpu]'") from e


def _sampling_params(max_tokens: int):
    kw = dict(temperature=0.0, max_tokens=max_tokens, logprobs=5)
    try:  # vLLM >= 0.10
        from vllm.sampling_params import StructuredOutputsParams

        return vllm.SamplingParams(**kw, structured_outputs=StructuredOutputsParams(json=GRADE_SCHEMA))
    except (ImportError, TypeError):
        from vllm.sampling_params import GuidedDecodingParams

        return vllm.SamplingParams(**kw, guided_decoding=GuidedDecodingParams(json=GRADE_SCHEMA))


class VLLMBackend:
    name = "vllm"

    def __init__(self, cfg, gpu_memory_utilization: float = 0.85, **engine_kwargs):
        from assay.models import resolve

        r = resolve(cfg.model)
        model = r.path
        kw = dict(enable_prefix_caching=True, max_model_len=cfg.n_ctx, gpu_memory_utilization=gpu_memory_utilization)
        if r.kind == "gguf":  # vLLM reads GGUF with the tokenizer of the original repo
            kw["tokenizer"] = engine_kwargs.pop("tokenizer", "HuggingFaceTB/SmolLM2-135M-Instruct")
        kw.update(engine_kwargs)
        self.cfg = cfg
        self.model_id = f"{cfg.model}@vllm"
        self.llm = vllm.LLM(model=model, **kw)
        self.params = _sampling_params(cfg.max_tokens)

    def complete(self, prompts: list[str]) -> list[Completion]:
        if not prompts:
            return []
        t0 = time.perf_counter()
        try:
            outs = self.llm.chat([[{"role": "user", "content": p}] for p in prompts], self.params, use_tqdm=False)
        except Exception as e:
            if len(prompts) == 1:
                return [Completion(None, None, None, (time.perf_counter() - t0) * 1e3,
                                   f"{e.__class__.__name__}: {redact_text(str(e))[:300]}")]
            log.warning("vLLM batch failed (%s); retrying its prompts one by one", redact_text(str(e)))
            return [c for p in prompts for c in self.complete([p])]
        ms = (time.perf_counter() - t0) * 1e3 / len(prompts)
        return [self._completion(o, ms) for o in outs]

    def _completion(self, out, ms: float) -> Completion:
        gen = out.outputs[0]
        seq = []
        for tid, lps in zip(gen.token_ids, gen.logprobs or []):
            chosen = lps.get(tid)
            top = {(lp.decoded_token or ""): lp.logprob for lp in lps.values()}
            seq.append(((chosen.decoded_token if chosen else "") or "", chosen.logprob if chosen else None, top))
        tokens = len(out.prompt_token_ids or []) + len(gen.token_ids)
        return Completion(gen.text, grade_token_logprobs(seq) if seq else None, tokens, ms, None)

    def close(self) -> None:
        self.llm = None
