"""The serving engine: continuous batching over a paged latent cache, per-request sampling,
optional MTP self-speculative decoding.

    engine = Engine(model, max_batch_size=8, decode=tokenizer.decode, eos_token_id=1)
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=64, temperature=0.7))
    while engine.has_unfinished():
        for out in engine.step(): ...                 # RequestOutput per request that advanced

Each `step()` is one scheduler iteration:
  1. admit waiting requests (first come, first served) while the batch has room and the cache
     has blocks for them beyond what the running ones need this step; their prompts are
     prefilled together, a padded batch, in chunks of up to prefill_chunk tokens, through the
     naive MLA path (per-head K/V, compute-friendly: the prompt's queries and keys are the same
     tokens), and each samples its first token once its whole prompt is in;
  2. one decode forward for every request that was already running, batched whatever their
     lengths: the new token of each sequence sits at its own position, the cache view gathers
     each sequence's latents by its block table (index tensors built once per step and used
     by every layer), and attention runs through the absorbed path (W_UK folded into the query,
     W_UV after; copies made once at construction), reading only the latent cache.
The copies an engine makes of the weights at construction (W_UK/W_UV, the routed experts and,
compiled, the Linears packed for the CPU kernels, and a frozen graph's constants) are what
serving wants; for a model that changes in place afterwards (evaluation or rollouts between
optimizer steps) use Engine(freeze=False), which makes none and reads the weights as they are.
Requests join and leave between steps. When the cache runs out of blocks, the most recently
admitted request is preempted: its blocks are freed and it waits at the head of the queue; on
readmission its prompt and the tokens it generated are prefilled again (recompute), and it
continues where it stopped (same tokens for greedy decoding, and seeded sampling continues
its own generator).

With mtp=True every decode forward verifies MTP's drafts for each sequence (speculative.py): one
per step, or with mtp_drafts=k a chain of k, so a step emits 1 to k + 1 tokens per sequence;
stats() reports the share of drafts accepted. A compiled engine verifies and drafts a batch of
greedy requests in one call (speculative.greedy_step).
Drafts are chosen among the `draft_vocab` most frequent tokens (default DRAFT_VOCAB_SHARE of the
vocabulary; speculative.py says why); the output does not depend on it.

Log-probabilities (SamplingParams.logprobs / prompt_logprobs) are log_softmax of the raw logits
of the forward that produced each token (sampling.token_logprobs): a sampled token's from the
logits it was drawn from (its own position of a verify forward under MTP), a prompt token's from
the prefill forward, which then also runs the head over the positions of the prompt (only for
requests that ask). They cover every token sampled, including the one that ends a generation
(eos, a stop token, the token completing a stop string), which token_ids and the text leave out.
A request with max_tokens=0 (allowed with prompt_logprobs) ends after its prefill.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch
from torch.fx.experimental import _config as shape_config

from dsv3.device import COMPILE_NEEDS, can_compile
from dsv3.infer.autotune import GEMM_TEMPLATES, cold_cache_timing
from dsv3.infer.cache import PagedLatentCache, int64_tensor
from dsv3.infer.chat import IncrementalText
from dsv3.infer.sampling import SamplingBatch, SamplingParams, TokenLogprob, greedy_tokens, token_logprobs
from dsv3.infer.speculative import greedy_step, mtp_logits, restrict_drafts, verify
from dsv3.model.attention import MLA
from dsv3.model.linear import INLINE_MAX_ROWS, PANEL_ROWS, compiled_prefill, pack_linears
from dsv3.model.moe import GroupedExperts, max_fused_tokens

__all__ = ["Engine", "RequestOutput", "SamplingParams"]

CACHE_DTYPES = ("auto", "bf16", "fp8")
MAX_MTP_DRAFTS = 8  # chained drafts per step (Engine(mtp_drafts=...))
DRAFT_VOCAB_SHARE = 0.125  # of the vocabulary MTP drafts among by default (speculative.restrict_drafts)
HEAD_ROWS = 512  # prompt positions whose logits are computed at a time (bounds [rows, vocab] memory)
# graphs Dynamo may keep per compiled call of one model (its default, 8, is fewer than warmup()
# compiles: past it, a call runs eagerly, silently ~2x slower; Engine._fast says more)
RECOMPILE_LIMIT = 64


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # all generated so far (stop string / eos excluded when finished)
    new_token_ids: list[int]  # generated in this step
    text: str | None  # decoded generated text so far, if the Engine has decode
    finished: bool
    finish_reason: str | None  # "stop" (eos / stop token / stop string) | "length" | "abort"
    # with params.logprobs: one per token sampled so far, including one that ended the request
    logprobs: list[TokenLogprob] | None = None
    # with params.prompt_logprobs: one per prompt token, None for the first (it has no context)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    order: int  # arrival number: preemption takes the latest
    output: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose latents are in the cache; tokens[num_cached] is pending
    prefill_to: int = 0  # the prompt (or re-prefill after preemption) is in the cache once num_cached is here
    seen: torch.Tensor | None = None  # [V] bool, for the repetition penalty
    draft: list[int] | None = None  # MTP's drafts for the tokens after the pending one
    draft_q: torch.Tensor | None = None  # [k, V] their distributions (sampled requests)
    text: IncrementalText | None = None  # with Engine(decode=...), once a token is out
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with params.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with params.prompt_logprobs

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def last_token(self) -> int:
        """tokens[-1] (the one a decode step feeds) without building `tokens`, whose copy grows
        with the sequence."""
        return self.output[-1] if self.output else self.prompt[-1]


class Engine:
    def __init__(
        self,
        model,
        *,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        cache_dtype: str = "auto",
        mtp: bool = False,
        mtp_drafts: int = 1,
        draft_vocab: int | None = None,
        decode=None,
        eos_token_id: int | None = None,
        prefill_chunk: int | None = None,
        compile: bool = False,
        freeze: bool = True,
    ):
        cfg = model.cfg
        max_seq_len = cfg.max_position_embeddings if max_seq_len is None else max_seq_len
        _need(
            isinstance(max_batch_size, int) and max_batch_size >= 1, "max_batch_size", max_batch_size, ">= 1"
        )
        _need(isinstance(block_size, int) and block_size >= 1, "block_size", block_size, ">= 1")
        _need(
            isinstance(max_seq_len, int) and 2 <= max_seq_len <= cfg.max_position_embeddings,
            "max_seq_len",
            max_seq_len,
            f"between 2 and max_position_embeddings={cfg.max_position_embeddings}",
        )
        _need(cache_dtype in CACHE_DTYPES, "cache_dtype", cache_dtype, f"one of {CACHE_DTYPES}")
        _need(
            prefill_chunk is None or (isinstance(prefill_chunk, int) and prefill_chunk >= 1),
            "prefill_chunk",
            prefill_chunk,
            "an integer >= 1 (or None: whole prompts)",
        )
        if mtp and not len(model.mtp):
            raise ValueError("mtp=True: the model has no MTP module (num_nextn_predict_layers=0)")
        _need(
            eos_token_id is None or 0 <= eos_token_id < cfg.vocab_size,
            "eos_token_id",
            eos_token_id,
            f"in [0, vocab_size={cfg.vocab_size})",
        )
        _need(
            draft_vocab is None or (isinstance(draft_vocab, int) and 1 <= draft_vocab <= cfg.vocab_size),
            "draft_vocab",
            draft_vocab,
            f"between 1 and vocab_size={cfg.vocab_size} (default: {DRAFT_VOCAB_SHARE:.1%} of the vocabulary)",
        )
        _need(mtp or draft_vocab is None, "draft_vocab", draft_vocab, "None without mtp=True (MTP drafts)")
        _need(
            isinstance(mtp_drafts, int) and 1 <= mtp_drafts <= MAX_MTP_DRAFTS,
            "mtp_drafts",
            mtp_drafts,
            f"an integer between 1 and {MAX_MTP_DRAFTS}",
        )
        _need(mtp or mtp_drafts == 1, "mtp_drafts", mtp_drafts, "1 without mtp=True (MTP drafts)")
        self.mtp_drafts = mtp_drafts if mtp else 0
        self.steps_per_decode = 1 + self.mtp_drafts  # tokens fed per sequence per decode forward
        # cache positions a decode step may write per sequence: the tokens it feeds and, past an
        # all-accepted verify, the MTP layer's positions of the chained drafts (`_draft`)
        self.positions_per_decode = max(self.steps_per_decode, 2 * self.mtp_drafts)
        blocks_per_seq = math.ceil((max_seq_len + self.positions_per_decode - 1) / block_size)
        num_blocks = max_batch_size * blocks_per_seq if num_blocks is None else num_blocks
        _need(
            isinstance(num_blocks, int) and num_blocks >= blocks_per_seq,
            "num_blocks",
            num_blocks,
            f">= {blocks_per_seq} (one sequence of max_seq_len={max_seq_len})",
        )

        self.model, self.cfg, self.mtp, self.decode, self.eos_token_id = (
            model.eval(),
            cfg,
            mtp,
            decode,
            eos_token_id,
        )
        self.max_batch_size, self.max_seq_len, self.prefill_chunk = max_batch_size, max_seq_len, prefill_chunk
        # compiled: decode and prefill run the same model compiled, with dynamic shapes (a graph
        # per regime, not per batch, context or prompt size: `warmup`, `_prompt_forward`)
        self.compiled, self.freeze = compile, freeze  # freeze (pack the weights): see _fast
        self._decode_forward = model  # what a decode step calls (lockstep.py may wrap the model)
        self._decode_step = torch.compile(decode_step, dynamic=True) if compile else decode_step
        self._prefill_step = torch.compile(prefill_step, dynamic=True) if compile else prefill_step
        self._draft_logits = torch.compile(mtp_logits, dynamic=True) if compile else mtp_logits
        self._greedy_step = torch.compile(greedy_step, dynamic=True) if compile else greedy_step
        self._warm = False
        emb = model.embed_tokens.weight
        self.device, self.dtype = emb.device, emb.dtype
        if compile and not can_compile(self.device):
            raise ValueError(
                f"compile=True: torch.compile cannot build code for {self.device.type} here "
                f"({COMPILE_NEEDS}); run without --compile"
            )
        cache_torch_dtype = torch.bfloat16 if cache_dtype == "bf16" else self.dtype
        self.cache = PagedLatentCache(
            cfg,
            num_blocks,
            block_size,
            dtype=cache_torch_dtype,
            fp8=cache_dtype == "fp8",
            num_layers=cfg.num_hidden_layers + (1 if mtp else 0),
            device=self.device,
        )
        if mtp:
            restrict_drafts(model, draft_vocab or math.ceil(DRAFT_VOCAB_SHARE * cfg.vocab_size))
        for m in model.modules():
            if isinstance(m, MLA):
                m.prepare_absorbed(self.dtype, panels=freeze and compile, enabled=freeze)
            elif isinstance(m, GroupedExperts):
                m.pack(freeze)
        self._panels = pack_linears(model, freeze and compile) > 0  # the Linears of few-row compiled steps
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._requests: dict[str, _Request] = {}
        self._outbox: list[RequestOutput] = []  # aborts, reported by the next step()
        self._ids = itertools.count()
        self._counters = dict.fromkeys(
            (
                "prompt_tokens_total",
                "generation_tokens_total",
                "forward_passes",
                "decode_forward_passes",
                "decode_sequence_forwards",
                "decode_tokens",
                "mtp_drafted",
                "mtp_accepted",
                "preemptions",
            ),
            0,
        )

    @classmethod
    def from_pretrained(
        cls, folder, *, dtype=None, weights="auto", scale_format="pow2", device="cpu", **engine_kwargs
    ) -> Engine:
        """Load a checkpoint folder (ours or HF layout) and serve it; eos defaults to the config's.
        weights: "auto" keeps an FP8 checkpoint's weights in FP8, dequantized per GEMM
        (dsv3.fp8.resident), and loads any other in `dtype`; "fp8" keeps them FP8 whatever the
        checkpoint, quantizing at load with `scale_format` ("pow2" or "fp32") scales what it holds
        in higher precision; "bf16"/"fp32" dequantize at load to that dtype."""
        from dsv3.hf import load_pretrained

        if isinstance(dtype, str):
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype) or getattr(torch, dtype)
        model = load_pretrained(folder, device, dtype, weights, scale_format)
        engine_kwargs.setdefault("eos_token_id", model.cfg.eos_token_id)
        return cls(model, **engine_kwargs)

    def warmup(self) -> None:
        """Compile the decode step now instead of in the first requests; afterwards compiled calls
        skip re-checking guards that cannot change. Dynamic shapes specialize a size of 1, so the
        warm-up decodes every kind of step a request can meet: batch 1 and 2, each with a context
        of one cache block and of two (and, with MTP, greedy and sampled steps), and the smallest
        batches whose Linears start or stop running as fused loops or on the panel kernel
        (model/linear.py) and whose experts no longer run without dispatch (`MoE`), counting the
        rows of the verify (sequences x (1 + drafts) with MTP) and of a draft (one per sequence),
        if the engine takes them. Their prefills compile the prefill's graphs on the way (one and
        several prompts; with prefill_chunk, also a chunk after the first, which reads the cache)."""
        if not self.compiled or self._warm:
            return
        new = min(3, self.max_seq_len - 1)  # tokens per warm-up request: a few decode steps
        longest = self.max_seq_len - new
        greedy = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        # with MTP, greedy and sampled steps are different compiled calls (speculative.greedy_step)
        kinds = [greedy] + ([SamplingParams(max_tokens=new, ignore_eos=True, seed=0)] if self.mtp else [])
        # whether compiled steps run the experts on the panel kernel (MoE), not gathered
        expert_panels = any(
            isinstance(m, GroupedExperts) and m.down_panels is not None for m in self.model.modules()
        )
        limits = (
            INLINE_MAX_ROWS,
            max_fused_tokens(self.cfg.n_routed_experts, self.cfg.num_experts_per_tok, expert_panels),
            *([PANEL_ROWS[0] - 1, PANEL_ROWS[1]] if self._panels else []),
        )
        # sequences; MTP's draft runs the MTP block's FFN on one row per sequence (Block's `rows`)
        past = {rows // T + 1 for rows in limits for T in {self.steps_per_decode, 1}}
        contexts = {min(2, longest), min(self.cache.block_size + 2, longest)}
        if self.prefill_chunk and self.prefill_chunk + 2 <= longest:  # a second chunk of 2 tokens
            contexts.add(self.prefill_chunk + 2)
        for batch in sorted({1, 2} | {b for b in past if b <= self.max_batch_size}):
            for context in sorted(contexts):
                for params in kinds:
                    self.generate([[0] + [1] * (context - 1)] * batch, params)
        self._warm = True

    def _fast(self, fn, *args, prefill: bool = False):
        """Call a compiled step (a decode step, or with prefill=True a prefill's). Guard evaluation
        costs ~1 ms per call on a CPU: once warmed up, only the guards that pick among its graphs
        run; a call that needs a new graph (a shape the warm-up did not cover) is compiled with
        the full guards instead.

        Unless Engine(freeze=False), every decode step's compile freezes the weights (Inductor's
        `freezing`; torch.compile's `options` do not reach it in torch 2.13, so it is set around
        the calls that may compile): they become constants of the graph, so on a CPU each
        nn.Linear weight is packed once into oneDNN's (or MKL's) blocked GEMM layout, whose small-M
        kernels stream it faster than aten's GEMV/GEMM on the row-major weight (an uncached 8192 x 256 F32 head
        on a 2-core EPYC: 16 rows 0.61 vs 1.56 ms, 1 row 0.40-0.44 vs 0.75 ms; the decode rates
        are in benchmarks/README.md), and constant expressions of weights fold away. The packed
        copies are made at compile time, so the weights must not change afterwards (serving
        never does; freeze=False for a model updated in place), and they add the dense Linears'
        bytes once more. Every step runs its Linears on the packed copies, whatever its rows
        (model/linear.py says why); a step of at most INLINE_MAX_ROWS tokens runs the router and
        its attention over the latent cache as loops Inductor generates and fuses. The experts
        are inputs of ops Inductor does not pack: the engine packs them itself at construction
        (GroupedExperts.pack, model/packed_experts.py), and they too add their bytes once more; a
        step of up to 16 rows per expert runs a MoE layer as one call of the panel kernel from
        the router's choice (MoE in model/moe.py; gathered in Inductor's loops where the kernel
        is not built), larger or uncompiled ones dispatch to the packed experts; embeddings and
        FP8-resident weights stay as they are. Dynamo keys graphs by the module they were traced
        from, so engines of different models in one process each get their own.

        Compiles of decode steps also let Inductor time its own C++ GEMM template (max-autotune,
        CPP backend) against the library call for each GEMM of the graph and keep the faster,
        timed with the weights out of cache as a decode step reads them (infer/autotune.py); the
        choices are cached on disk with the compiled graphs. A prefill's compile does neither: its
        GEMMs have many rows, of any count, where the library's are the fast ones (with the
        template Inductor kept, a 64-token prefill of tiny took 6.3 ms, against 3.3), and
        frozen, a graph holds oneDNN-packed weights that Inductor cannot cache on disk, so each
        process would compile it afresh (~12 s on a CPU, for 0.3 of 4.5 ms per 64-token prefill).
        Compiles also turn off Dynamo's duck shaping, which gives sizes equal at trace time one
        symbol: a cache read of 2 blocks in a 2-token step would then be fixed at 2 blocks by the
        step's own size checks (a fresh compile mid-request when the sequence grows). And they make the model's float constants (norm epsilons, the
        softmax scale, the routed scaling factor) constants of the graph: left symbolic, each is
        an input wrapped in a tensor on every call (25 per step on the tiny preset; its forward
        0.77 -> 0.65 ms on one core). The code that calls a graph's kernels is C++ (Inductor's
        `cpp_wrapper`), not Python that takes ~0.1-0.4 ms per call to allocate and dispatch
        (tiny, one core, a whole engine step: 0.83 -> 0.70 ms; with MTP 1.87 -> 1.64 ms).

        Inductor rounds to BF16 wherever the model does (`emulate_precision_casts`). Left to
        itself it keeps a fused loop's intermediates in FP32, and which loops fuse depends on the
        graph: the 1-token step and MTP's 2-token verify then differed in the last bits of the
        same row (a residual add rounded in one graph and not in the other, before RMSNorm), and a
        near-tie of the logits could give the verify another greedy token than plain decoding.
        Rounded as the model says, the two graphs give the row the same bits (tested).

        Each regime of the step (batch 1, 2, the Linears on the panel kernel or on Inductor's
        GEMMs, the experts gathered or not) x each cache-read shape is one graph of the
        same compiled call, up to RECOMPILE_LIMIT of them; past Dynamo's default limit (8) the
        step would run uncompiled (small, 16 sequences, one core: 36-37 vs 20-21 ms per step)."""
        if not self.compiled:
            return fn(*args)
        if self._warm:
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return fn(*args)
            except RuntimeError as e:
                if "Recompilation triggered" not in str(e):
                    raise
        with (
            torch._inductor.config.patch(
                freezing=self.freeze and not prefill,
                cpp_wrapper=True,
                emulate_precision_casts=True,
                **({} if prefill else GEMM_TEMPLATES),
            ),
            shape_config.patch(use_duck_shape=False),
            torch._dynamo.config.patch(specialize_float=True, recompile_limit=RECOMPILE_LIMIT),
            cold_cache_timing(),
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", "TypedStorage is deprecated")  # Inductor's autotuner
            return fn(*args)

    # ------------------------------------------------------------------ requests
    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        """Queue a request; ValueError on a bad prompt, bad parameters or too long a request."""
        prompt = self.check_request(prompt_token_ids, params)
        request_id = f"req-{next(self._ids)}" if request_id is None else str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request_id={request_id!r} is already in use by an unfinished request")
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())
        req = _Request(request_id, prompt, params, torch.Generator().manual_seed(seed), next(self._ids))
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None] * len(prompt)
        if params.repetition_penalty != 1.0:
            req.seen = torch.zeros(self.cfg.vocab_size, dtype=torch.bool, device=self.device)
            req.seen[int64_tensor(prompt, self.device)] = True
        self._requests[request_id] = req
        self.waiting.append(req)
        return request_id

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        """add_request's checks, queueing nothing (a front end placing requests on other ranks
        checks them here): the prompt as a list, or ValueError naming what is wrong."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        V = self.cfg.vocab_size
        prompt = list(prompt_token_ids) if isinstance(prompt_token_ids, (list, tuple)) else None
        if not prompt or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in prompt
        ):
            raise ValueError(
                f"prompt_token_ids must be a non-empty list of token ids in [0, {V}), got {prompt_token_ids!r:.100}"
            )
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(prompt) + params.max_tokens} exceeds max_seq_len={self.max_seq_len}"
            )
        if params.stop and self.decode is None:
            raise ValueError(f"stop={params.stop!r}: stop strings need Engine(decode=...)")
        return prompt

    def abort(self, request_id: str) -> None:
        """Stop a request now; its final output (finish_reason "abort") comes with the next step().
        Unknown or already finished ids are ignored."""
        req = self._requests.get(request_id)
        if req is None:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        req.finish_reason = "abort"
        self._finish(req)
        self._outbox.append(self._output(req, []))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._outbox)

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[RequestOutput]:
        """Run the prompts (batched with anything already queued) until each has left the engine:
        finished, or, from an engine that hands requests on (disaggregate.PrefillEngine), handed
        off. The last output of each, in order: the final one where it finished."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} SamplingParams for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        last: dict[str, RequestOutput] = {}
        while any(i in self._requests for i in ids) or self._outbox:
            last.update((out.request_id, out) for out in self.step())
        return [last[i] for i in ids]

    def stats(self) -> dict:
        c, cache = self._counters, self.cache
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "cache_blocks_used": cache.blocks_used,
            "cache_blocks_total": cache.num_blocks,
            "cache_bytes_used": cache.bytes_used,
            "cache_bytes_total": cache.nbytes,
            "cache_bytes_per_token": cache.bytes_per_token,
            **{
                k: c[k]
                for k in (
                    "prompt_tokens_total",
                    "generation_tokens_total",
                    "forward_passes",
                    "mtp_drafted",
                    "mtp_accepted",
                    "preemptions",
                )
            },
            "mtp_acceptance_rate": c["mtp_accepted"] / c["mtp_drafted"] if c["mtp_drafted"] else None,
            # tokens a sequence gains per decode forward it takes part in (1 without MTP)
            "tokens_per_forward": c["decode_tokens"] / c["decode_sequence_forwards"]
            if c["decode_sequence_forwards"]
            else None,
        }

    # ------------------------------------------------------------------ one iteration
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        outputs, self._outbox = self._outbox, []
        decoding = [r for r in self.running if r.num_cached >= r.prefill_to]  # prompts already in the cache
        self._admit(decoding)
        prefilling = [r for r in self.running if r.num_cached < r.prefill_to]
        if prefilling:
            self._prefill(prefilling, outputs)
        decoding = self._make_room([r for r in decoding if r.finish_reason is None])
        if decoding:
            self._decode(decoding, outputs)
        return outputs

    def _admit(self, decoding: list[_Request]) -> None:
        """Move waiting requests into the batch while it has room and the cache has blocks for their
        whole prompt beyond what the decoding ones need this step (first come, first served)."""
        if not self.waiting or len(self.running) >= self.max_batch_size:
            return
        reserve = sum(
            self.cache.blocks_needed(r.id, r.num_cached + self.positions_per_decode) for r in decoding
        )
        while self.waiting and len(self.running) < self.max_batch_size:
            req = self.waiting[0]
            # a fresh request feeds its prompt; a preempted one all its tokens but the pending one
            n = len(req.prompt) + len(req.output) - (1 if req.output else 0)
            need = self.cache.blocks_needed(req.id, n + self.positions_per_decode)
            if not self.cache.can_allocate(need + reserve):
                break
            self.waiting.popleft()
            self.cache.ensure(req.id, n + self.positions_per_decode)
            req.num_cached, req.prefill_to = 0, n
            self.running.append(req)

    def _prefill(self, reqs: list[_Request], outputs: list[RequestOutput]) -> None:
        """One forward over the next prompt chunk of every prefilling request (naive MLA), as a
        padded batch: row b feeds tokens[num_cached : num_cached + n_b] (n_b <= prefill_chunk) and
        attends to its cached earlier chunks and causally within the chunk. A request whose prompt
        is complete samples its first token (a preempted one already has it pending), or ends
        there with max_tokens=0."""
        starts = [r.num_cached for r in reqs]
        ns = [min(r.prefill_to - r.num_cached, self.prefill_chunk or r.prefill_to) for r in reqs]
        T = max(ns)
        ids = int64_tensor(
            [t for r, s, n in zip(reqs, starts, ns) for t in r.tokens[s : s + n] + [0] * (T - n)], self.device
        ).view(len(reqs), T)
        view = self.cache.view([r.id for r in reqs], starts, T, read=any(starts), lengths=ns)
        last = torch.tensor(ns, device=self.device) - 1  # each row's last real position
        chain = None  # with chained drafts: their positions, from each row's last one on (`_draft`)
        if self.mtp_drafts > 1:  # every row drafts (an expert-parallel rank runs the same MTP calls
            # whatever its requests); a row still prefilling writes a position its next chunk overwrites
            chain = self.cache.view(
                [r.id for r in reqs], [s + n - 1 for s, n in zip(starts, ns)], 1, reach=self.mtp_drafts
            )
        out = self._prompt_forward(prefill_step, self._prefill_step, ids, view, view.start_pos, last)
        self._counters["forward_passes"] += 1
        for b, (r, s, n) in enumerate(zip(reqs, starts, ns)):
            if r.prompt_logprobs is not None and not r.output:
                self._score_prompt(r, out.hidden[b], s, n)
            r.num_cached += n
            self._counters["prompt_tokens_total"] += 0 if r.output else n
        done = [i for i, r in enumerate(reqs) if r.num_cached == r.prefill_to and not r.output]
        for i in [i for i in done if reqs[i].params.max_tokens == 0]:  # the prompt was all it asked for
            reqs[i].finish_reason = "length"
            self._finish(reqs[i])
            outputs.append(self._output(reqs[i], []))
        done = [i for i in done if reqs[i].finish_reason is None]
        if done:
            sampled = [reqs[i] for i in done]
            batch = self._sampling(sampled)
            logits = out.logits[done, 0]  # [D, V]
            tokens = batch.next_tokens(logits)
            for i, t, lp in zip(done, tokens.tolist(), self._logprobs(sampled, logits, tokens)):
                outputs.append(self._emit(reqs[i], [t], [lp]))
        if self.mtp:  # MTP over the same positions, to fill its cache layer and draft where the prompt ends
            next_ids = torch.tensor(
                [(r.tokens[s + 1 : s + n + 1] + [0] * T)[:T] for r, s, n in zip(reqs, starts, ns)],
                device=self.device,
            )
            logits, h = self._prompt_forward(
                mtp_logits, self._draft_logits, out.hidden, next_ids, view, view.start_pos, False, last
            )
            ready = [
                i for i, r in enumerate(reqs) if r.num_cached == r.prefill_to and r.finish_reason is None
            ]
            self._draft(reqs, ready, logits, h, chain, torch.zeros_like(last))

    def _prompt_forward(self, eager, compiled, prompt: torch.Tensor, *args):
        """A prefill's call of a function of the model (`eager`; `compiled`: the engine's) on
        prompt [B, T, ...] and args. Compiled, it is traced as eager code runs
        (linear.compiled_prefill), so one graph serves every prompt length of at least 2; a
        1-token chunk (a 1-token prompt) runs eagerly, as a size of 1 would be a graph of its
        own, compiled mid-serving for no gain."""
        if compiled is eager or prompt.shape[1] == 1:
            return eager(self.model, prompt, *args)
        with compiled_prefill():
            return self._fast(compiled, self.model, prompt, *args, prefill=True)

    def _decode(self, reqs: list[_Request], outputs: list[RequestOutput]) -> None:
        """One batched forward: each sequence's pending token (and its draft) at its own position.
        A compiled MTP engine runs a batch of greedy requests without repetition penalty as one
        call that also drafts (speculative.greedy_step)."""
        T = self.steps_per_decode
        view = self.cache.view(
            [r.id for r in reqs], [r.num_cached for r in reqs], T, reach=self.positions_per_decode
        )
        fed = int64_tensor(
            [t for r in reqs for t in ([r.last_token, *r.draft] if self.mtp else [r.last_token])], self.device
        ).view(len(reqs), T)
        batch = self._sampling(reqs)
        c = self._counters
        c["forward_passes"] += 1
        c["decode_forward_passes"] += 1
        c["decode_sequence_forwards"] += len(reqs)
        if self.mtp and self.compiled and batch.all_greedy and batch.seen is None:
            logits, tokens, accepted, drafts = self._fast(
                self._greedy_step, self.model, fed, view, view.start_pos
            )
            self._verified(reqs, logits, tokens, accepted, outputs)
            for r, d in zip(reqs, drafts.tolist()):
                r.draft, r.draft_q = d, None
            return
        out, best = self._fast(self._decode_step, self._decode_forward, fed, view, view.start_pos)
        if not self.mtp:
            tokens = (
                best[:, 0] if batch.all_greedy and batch.seen is None else batch.next_tokens(out.logits[:, 0])
            )
            for r, t, lp in zip(reqs, tokens.tolist(), self._logprobs(reqs, out.logits[:, 0], tokens)):
                r.num_cached += 1
                c["decode_tokens"] += 1
                outputs.append(self._emit(r, [t], [lp]))
            return
        drafts = fed[:, 1:]  # [B, k]
        q = None
        if not batch.all_greedy:
            q = torch.stack(
                [
                    r.draft_q
                    if r.draft_q is not None
                    else torch.nn.functional.one_hot(drafts[i], self.cfg.vocab_size).float()
                    for i, r in enumerate(reqs)
                ]
            )  # [B, k, V]
        tokens, accepted = verify(batch, out.logits, drafts, q)
        self._verified(reqs, out.logits, tokens, accepted, outputs)
        live = [i for i, r in enumerate(reqs) if r.finish_reason is None]
        if live:  # MTP over positions n..n+k (those past the accepted drafts are padding)
            logits, h = self._fast(
                self._draft_logits, self.model, out.hidden, tokens, view, view.start_pos, True, accepted
            )
            self._draft(reqs, live, logits, h, view, accepted)

    def _verified(self, reqs, logits, tokens, accepted, outputs) -> None:
        """Emit each sequence's verified tokens: tokens[b, :accepted[b] + 1] of the verify's
        tokens [B, 1 + k] (its logits [B, 1 + k, V])."""
        c = self._counters
        accepted = accepted.tolist()
        c["mtp_drafted"] += len(reqs) * self.mtp_drafts
        c["mtp_accepted"] += sum(accepted)
        lps = [self._logprobs(reqs, logits, tokens, j) for j in range(tokens.shape[1])]
        for i, (r, row, a) in enumerate(zip(reqs, tokens.tolist(), accepted)):
            r.num_cached += 1 + a  # a rejected draft's slot is rolled back by the length alone
            c["decode_tokens"] += 1 + a
            outputs.append(self._emit(r, row[: a + 1], [lp[i] for lp in lps[: a + 1]]))

    def _draft(self, reqs, keep: list[int], logits, h, view, offset: torch.Tensor) -> None:
        """The next drafts of the requests at rows `keep`, each sampled with its own parameters:
        the first from MTP's logits [B, V] (h [B, 1, H]: the MTP block's output they came from),
        each further one from the MTP module run again, one position on, on its own output and
        the draft before (the c-th at the position of view.at(offset + c)). Rows not kept (done,
        or still prefilling) go on with token 0, their drafts unused, drawing nothing from their
        generators."""
        batch = self._sampling([reqs[i] for i in keep])
        drafts, qs = [], []
        for c in range(self.mtp_drafts):
            if c:
                at = view.at(offset + c)
                logits, h = self._fast(
                    self._draft_logits, self.model, h, drafts[-1][:, None], at, at.start_pos, True
                )
            d = torch.zeros(len(reqs), dtype=torch.int64, device=self.device)  # [B]
            if keep:
                qs.append(batch.probs(logits[keep]))  # [len(keep), V]
                d[keep] = batch.sample(qs[-1])
            drafts.append(d)
        for j, (i, row) in enumerate(zip(keep, torch.stack(drafts, dim=1)[keep].tolist())):
            r = reqs[i]
            r.draft, r.draft_q = row, (None if r.params.greedy else torch.stack([q[j] for q in qs]))

    # ------------------------------------------------------------------ log-probabilities
    def _logprobs(
        self, reqs: list[_Request], logits: torch.Tensor, tokens: torch.Tensor, position: int | None = None
    ) -> list[TokenLogprob | None]:
        """logits [B, V] the tokens [B] were sampled from -> per request that asks, the token's
        log-probability and its `logprobs` most likely tokens; None for the others. With
        `position`, logits [B, T, V] and tokens [B, T], of which that position's (selected only
        where a request asks: an MTP step would index each position's logits for nothing)."""
        rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        found: list[TokenLogprob | None] = [None] * len(reqs)
        if rows:
            if position is not None:
                logits, tokens = logits[:, position], tokens[:, position]
            top = max(reqs[i].params.logprobs for i in rows)
            for i, lp in zip(rows, token_logprobs(logits[rows], tokens[rows], top)):
                found[i] = TokenLogprob(lp.token_id, lp.logprob, lp.top[: reqs[i].params.logprobs])
        return found

    def _score_prompt(self, req: _Request, hidden: torch.Tensor, start: int, n: int) -> None:
        """Log-probabilities of the prompt tokens this prefill chunk predicts. hidden [T, H]: the last
        block's output at positions start..start+n-1 (then padding); position start + j predicts
        prompt token start + j + 1. The head runs HEAD_ROWS positions at a time."""
        m = min(n, len(req.prompt) - 1 - start)  # the last prompt position predicts a generated token
        for lo in range(0, m, HEAD_ROWS):
            hi = min(m, lo + HEAD_ROWS)
            logits = self.model.lm_head(self.model.norm(hidden[lo:hi]))  # [hi - lo, V]
            targets = torch.tensor(req.prompt[start + lo + 1 : start + hi + 1], device=self.device)
            req.prompt_logprobs[start + lo + 1 : start + hi + 1] = token_logprobs(
                logits, targets, req.params.prompt_logprobs
            )

    # ------------------------------------------------------------------ bookkeeping
    def _sampling(self, reqs: list[_Request]) -> SamplingBatch:
        return SamplingBatch(
            [r.params for r in reqs], [r.generator for r in reqs], [r.seen for r in reqs], self.device
        )

    def _make_room(self, reqs: list[_Request]) -> list[_Request]:
        """Blocks for this step's new tokens; preempt the latest arrivals while they are short."""
        reqs = sorted(reqs, key=lambda r: r.order)
        if self.cache.hold([(r.id, r.num_cached + self.positions_per_decode) for r in reqs]):
            return reqs  # most steps: every sequence's last block has room
        i = 0
        while i < len(reqs):
            if self.cache.ensure(reqs[i].id, reqs[i].num_cached + self.positions_per_decode):
                i += 1
                continue
            victim = max(self.running, key=lambda r: r.order)
            self._preempt(victim)
            if victim in reqs:
                reqs.remove(victim)
        return reqs

    def _preempt(self, req: _Request) -> None:
        self.cache.release(req.id)
        self.running.remove(req)
        req.num_cached, req.draft, req.draft_q = 0, None, None
        self.waiting.appendleft(req)
        self._counters["preemptions"] += 1

    def _emit(self, req: _Request, tokens: list[int], logprobs: list[TokenLogprob | None]) -> RequestOutput:
        """Append sampled tokens one by one, stopping at eos / stop token / stop string / length;
        each token taken (the one that stops the request too) adds its log-probability, if asked.
        The text grows by IncrementalText: each token is decoded in a short window and read once
        by the stop strings' automata, so a generation's text costs time linear in its length."""
        p, new = req.params, []
        for t, lp in zip(tokens, logprobs):
            self._counters["generation_tokens_total"] += 1
            if lp is not None:
                req.logprobs.append(lp)
            if (t == self.eos_token_id and not p.ignore_eos) or t in p.stop_token_ids:
                req.finish_reason = "stop"
                break
            req.output.append(t)
            if req.seen is not None:
                req.seen[t] = True
            if self.decode is not None:
                req.text = req.text or IncrementalText(self.decode, p.stop)
                cut = req.text.add(req.output)
                if cut is not None:  # the token completing a stop string is dropped, the text cut before it
                    req.output.pop()
                    req.text.cut(cut)
                    req.finish_reason = "stop"
                    break
            new.append(t)
            if len(req.output) >= p.max_tokens:
                req.finish_reason = "length"
                break
        if req.finish_reason is not None:
            if req.text is not None:
                req.text.finish(req.output)
            self._finish(req)
        return self._output(req, new)

    @staticmethod
    def _visible_text(req: _Request) -> str | None:
        """The text to report: all of it once finished; while running, without a tail that may
        still turn into a stop string or is an incomplete character, so that it only ever grows."""
        if req.text is None:
            return None
        return req.text.text if req.finish_reason is not None else req.text.visible

    def _finish(self, req: _Request) -> None:
        self.cache.release(req.id)
        if req in self.running:
            self.running.remove(req)
        self._requests.pop(req.id, None)

    def _output(self, req: _Request, new: list[int]) -> RequestOutput:
        return RequestOutput(
            req.id,
            req.prompt,
            list(req.output),
            new,
            self._visible_text(req),
            req.finish_reason is not None,
            req.finish_reason,
            list(req.logprobs) if req.params.logprobs is not None else None,
            req.prompt_logprobs,
        )


def decode_step(forward, fed: torch.Tensor, cache, start_pos) -> tuple:
    """One decode forward (`forward`: the model) of fed [B, T] over the cache, and its greedy
    tokens [B, T]: the argmax runs inside a compiled step (a fused loop), not as an eager op
    after it (torch's argmax over [16, 8192] logits took ~75 us on a CPU core)."""
    out = forward(fed, cache=cache, start_pos=start_pos, absorb=True)
    return out, greedy_tokens(out.logits)


def prefill_step(forward, ids: torch.Tensor, cache, start_pos, last: torch.Tensor):
    """A prefill forward of ids [B, T] over the cache (naive MLA: the prompt's queries and keys
    are the same tokens), with the logits of each row's last real position last [B]."""
    return forward(ids, cache=cache, start_pos=start_pos, absorb=False, logits_to_keep=last)


def _need(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: must be {rule}")
