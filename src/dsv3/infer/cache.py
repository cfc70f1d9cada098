"""The MLA latent KV cache: per layer only the normalized latent c_kv [kv_lora_rank] and the
shared RoPE key k_pe [qk_rope_head_dim] of each token, i.e.
    bytes per token = layers x (kv_lora_rank + qk_rope_head_dim) x dtype bytes
(70,272 B for DeepSeek-V3 in BF16), instead of layers x heads x (d_qk + d_v) for expanded K/V.

Two forms, both `dsv3.model.attention.AttentionCache`s (what MLA's `cache` argument takes):
  * `LatentCache`: contiguous, one [B, max_len, .] buffer per layer, for a batch that starts and
    grows together (`dsv3.infer.generate`, the attention tests).
  * `PagedLatentCache`: the serving form. One pool of fixed-size blocks per layer,
        kv: per layer [num_blocks * block_size, kv_lora_rank],  pe: per layer [num_blocks * block_size, d_rope],
    and a block table per sequence (its list of block ids; token position p lives in slot
    table[p // block_size] * block_size + p % block_size). Sequences of any lengths share the
    pool, take blocks as they grow and give them back when they finish, so memory is bounded by
    the tokens actually held, not by batch x max length. A forward over a batch gets a
    `CacheView`: the slots its new tokens are written to and, for decode, the blocks each
    sequence reads (index tensors built once per step and used by every layer; each layer
    gathers whole blocks, contiguous chunks, into [B, S, .] for attention, or for absorbed
    decode hands the blocks and the tables to model/paged_attention.py's kernel, which reads
    them in place).

Optional FP8 storage (`fp8=True`): c_kv as E4M3 codes with one FP32 scale per 128 values (the
activation tiling of `dsv3.fp8.quant`, ACT), k_pe kept in BF16 (RoPE dims are the most sensitive
and only 64 wide); V3: 61 x (512 + 4 x 4 + 64 x 2) = 40,016 B per token against 70,272 in BF16.
"""

from __future__ import annotations

import array
import math
from collections.abc import Hashable

import torch

from dsv3.config import ModelConfig
from dsv3.fp8.quant import ACT, TILE, Fp8Tensor, quantize
from dsv3.model import paged_attention
from dsv3.model.attention import AttentionCache
from dsv3.model.paged_attention import PagedLatents


class LatentCache(AttentionCache):
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        if max_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_len={max_len} exceeds max_position_embeddings={cfg.max_position_embeddings}"
            )
        n_layers = cfg.num_hidden_layers
        self.max_len = max_len
        self.kv = torch.zeros(n_layers, batch_size, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(n_layers, batch_size, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)

    def update(
        self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, start_pos: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write c_kv [B, T, r] and k_pe [B, T, dr] at start_pos; return all up to start_pos+T."""
        if isinstance(start_pos, torch.Tensor):
            raise TypeError(
                "LatentCache holds a batch at one position: start_pos must be an int "
                "(per-sequence positions need a PagedLatentCache view)"
            )
        end = start_pos + c_kv.shape[1]
        if end > self.max_len:
            raise ValueError(f"cache overflow: positions up to {end} but max_len={self.max_len}")
        self.kv[layer_idx, :, start_pos:end] = c_kv
        self.pe[layer_idx, :, start_pos:end] = k_pe
        return self.kv[layer_idx, :, :end], self.pe[layer_idx, :, :end]

    @property
    def bytes_per_token(self) -> int:
        """Bytes held per cached token position (all layers), from the allocated tensors."""
        per_pos = lambda t: t[:, 0, 0].numel() * t.element_size()  # noqa: E731  [L, width] per position
        return per_pos(self.kv) + per_pos(self.pe)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.pe.numel() * self.pe.element_size()


class PagedLatentCache:
    """A pool of `num_blocks` blocks of `block_size` token slots per layer, shared by sequences.

    `num_layers` defaults to the main model's layers; the engine adds the MTP modules' layers
    (their blocks have layer_idx num_hidden_layers + k) when it drafts with them."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        fp8: bool = False,
        num_layers: int | None = None,
        device="cpu",
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must both be >= 1")
        L, r, dr = num_layers or cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.num_blocks, self.block_size, self.fp8, self.dtype = num_blocks, block_size, fp8, dtype
        slots = (num_blocks + 1) * block_size  # + one scratch block that padding tokens write to
        # one tensor per layer (not one [L, ...] tensor): a compiled decode step then writes each
        # layer's slots in place instead of copying the whole pool
        if fp8:  # E4M3 codes as uint8 (indexing float8 tensors is not supported everywhere)
            self.kv = [torch.zeros(slots, r, dtype=torch.uint8, device=device) for _ in range(L)]
            self.kv_scale = [torch.zeros(slots, math.ceil(r / TILE), device=device) for _ in range(L)]
            self.pe = [torch.zeros(slots, dr, dtype=torch.bfloat16, device=device) for _ in range(L)]
        else:
            self.kv = [torch.zeros(slots, r, dtype=dtype, device=device) for _ in range(L)]
            self.kv_scale = None
            self.pe = [torch.zeros(slots, dr, dtype=dtype, device=device) for _ in range(L)]
        # the same tensors seen as [blocks, block_size, w], static under torch.compile: a compiled
        # step's slot arithmetic (slot // block_size, % block_size) is then on constants the C++
        # compiler folds, not integer divisions on symbolic sizes in the innermost loop of the
        # attention (small preset, 512 positions, one core: 268 against 524 us per layer)
        self.blocks = {
            name: [_static_blocks(t, block_size) for t in group]
            for name, group in (("kv", self.kv), ("kv_scale", self.kv_scale), ("pe", self.pe))
            if group is not None
        }
        # absorbed decode attention reads the blocks in place (model/paged_attention.py) where it can
        self.paged_kernel = not fp8 and paged_attention.can_run(dtype, device, r, dr)
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id first
        self.block_tables: dict[Hashable, list[int]] = {}

    # ------------------------------------------------------------------ accounting
    def _tensors(self) -> list[torch.Tensor]:
        return [t for group in (self.kv, self.kv_scale, self.pe) if group is not None for t in group]

    @property
    def bytes_per_token(self) -> int:
        """Bytes per token slot, all layers, from the allocated tensors (FP8 scales included)."""
        return sum(t[0].numel() * t.element_size() for t in self._tensors())

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_size * self.bytes_per_token  # the scratch block not counted

    @property
    def blocks_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def bytes_used(self) -> int:
        return self.blocks_used * self.block_size * self.bytes_per_token

    # ------------------------------------------------------------------ blocks
    def blocks_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """How many more blocks `seq_id` needs to hold `num_tokens` positions."""
        have = len(self.block_tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def hold(self, lengths: list[tuple[Hashable, int]]) -> bool:
        """Whether every (seq_id, num_tokens) already has the blocks for its positions (one check
        for a whole batch: most decode steps allocate nothing)."""
        tables, bs = self.block_tables, self.block_size
        return all(len(tables.get(s, ())) * bs >= n for s, n in lengths)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def ensure(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Grow `seq_id`'s block table to hold `num_tokens` positions. False (and nothing
        allocated) when the pool has too few free blocks."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > len(self._free):
            return False
        table = self.block_tables.setdefault(seq_id, [])
        table.extend(self._free.pop() for _ in range(need))
        return True

    def release(self, seq_id: Hashable) -> None:
        """Give `seq_id`'s blocks back to the pool (rolling back a length needs no call: the
        engine's length is the truth, stale slots beyond it are masked and overwritten)."""
        self._free.extend(reversed(self.block_tables.pop(seq_id, [])))

    # ------------------------------------------------------------------ one forward's view
    def view(
        self,
        seq_ids: list[Hashable],
        start_pos: list[int],
        num_new: int,
        read: bool = True,
        lengths: list[int] | None = None,
        reach: int | None = None,
    ) -> CacheView:
        """The view for a forward over `num_new` new tokens of each sequence, sitting at
        start_pos[b].. . read=False (a prefill from position 0) attends to the new tokens only.
        lengths[b] <= num_new: how many of row b's tokens are real (a padded batch of prompt
        chunks); the padding's latents go to a scratch block no sequence owns. reach >= num_new:
        the positions from start_pos[b] that later forwards over the same view may write, one
        token per sequence each (`CacheView.at`: MTP's chained drafts); default num_new."""
        device, bs = self.kv[0].device, self.block_size
        tables = [self.block_tables[s] for s in seq_ids]
        reach = num_new if reach is None else reach
        # the slots in Python: a few integers per step, cheaper than a dozen small tensor ops
        slots = [
            (self.num_blocks if lengths is not None and j >= lengths[b] else table[p // bs]) * bs + p % bs
            for b, (table, start) in enumerate(zip(tables, start_pos))
            for j, p in enumerate(range(start, start + reach))
        ]  # [B * reach]
        slots_tensor = int64_tensor(slots, device).view(len(tables), reach)
        read_blocks = None
        if read:  # reads go by whole blocks (contiguous chunks); positions past a sequence's end are masked
            width = -(-(max(start_pos) + reach) // bs)  # blocks read per sequence
            flat: list[int] = []
            for t in tables:
                flat += t[:width]
                flat += [0] * (width - len(t))
            read_blocks = int64_tensor(flat, device).view(len(tables), width)
        start = int64_tensor(start_pos, device)  # [B]
        return CacheView(self, slots_tensor[:, :num_new].flatten(), read_blocks, start, slots_tensor)


def int64_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """torch.tensor(values) for a flat list of Python ints, several times faster: torch.tensor
    parses each int on its own (~0.1 us apiece: 50 us for the block tables of 16 sequences at 512
    positions, every decode step), array.array converts the list in one C loop and
    torch.frombuffer wraps that memory (keeping the array alive)."""
    if not values:
        return torch.empty(0, dtype=torch.int64, device=device)
    t = torch.frombuffer(array.array("q", values), dtype=torch.int64)
    return t if device.type == "cpu" else t.to(device)


class CacheView(AttentionCache):
    """What MLA sees as `cache` during one batched forward: `update` writes the new latents to
    their slots and returns each sequence's latents [B, S, .] (or the new ones themselves for a
    prefill). `start_pos` [B] is the tensor to pass the model as start_pos; the view was built
    for those positions, so `update` does not read its own start_pos argument."""

    def __init__(self, cache: PagedLatentCache, write_idx, read_blocks, start_pos, slots=None):
        self.cache, self.write_idx = cache, write_idx  # [B*T] slots of the new tokens
        self.read_blocks, self.start_pos = read_blocks, start_pos  # [B, S / block_size] or None; [B]
        self.slots = slots  # [B, reach] the slots of positions start_pos.. this view may write

    def at(self, offset: torch.Tensor) -> CacheView:
        """The view for one more token per sequence at position start_pos[b] + offset[b]
        (offset [B] < reach), reading the same blocks: a tensor expression, so a compiled step
        can place a token where its own results say."""
        rows = torch.arange(offset.shape[0], device=offset.device)
        return CacheView(self.cache, self.slots[rows, offset], self.read_blocks, self.start_pos + offset)

    def update(
        self,
        layer_idx: int,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        start_pos: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """c_kv [B, T, r], k_pe [B, T, dr] -> (c_kv [B, S, r], k_pe [B, S, dr]) in c_kv's dtype."""
        cache, B, r, dr = self.cache, c_kv.shape[0], c_kv.shape[-1], k_pe.shape[-1]
        self._write(layer_idx, c_kv, k_pe)
        if self.read_blocks is None:
            return c_kv, k_pe
        kv, pe = cache.blocks["kv"][layer_idx], cache.blocks["pe"][layer_idx]  # [blocks, bs, w]
        idx = self.read_blocks.flatten()

        def gather(pool: torch.Tensor) -> torch.Tensor:  # [blocks, bs, w] -> [B * S, w], block by block
            return pool.index_select(0, idx).view(-1, pool.shape[-1])

        kv = gather(kv)
        if cache.fp8:
            scale = gather(cache.blocks["kv_scale"][layer_idx])
            kv = Fp8Tensor(kv.view(torch.float8_e4m3fn), scale, ACT).dequantize(c_kv.dtype)
        return kv.view(B, -1, r).to(c_kv.dtype), gather(pe).view(B, -1, dr).to(k_pe.dtype)

    def update_paged(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> PagedLatents | None:
        """Store the new latents and return the layer's blocks and the sequences' block tables for
        paged_attention's kernel: for decode (a view that reads) of a cache in the model's dtype
        that the kernel runs on; else None, nothing stored."""
        cache = self.cache
        if self.read_blocks is None or not cache.paged_kernel or c_kv.dtype != cache.dtype:
            return None
        self._write(layer_idx, c_kv, k_pe)
        return PagedLatents(cache.blocks["kv"][layer_idx], cache.blocks["pe"][layer_idx], self.read_blocks)

    def _write(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """c_kv [B, T, r] and k_pe [B, T, dr] into their slots (E4M3 codes and scales for an FP8 cache)."""
        cache, (B, T, r), dr = self.cache, c_kv.shape, k_pe.shape[-1]

        def write(pool: torch.Tensor, rows: torch.Tensor) -> None:
            pool.view(-1, pool.shape[-1]).index_copy_(0, self.write_idx, rows.to(pool.dtype))

        if cache.fp8:
            q = quantize(c_kv.reshape(B * T, r), ACT)
            write(cache.blocks["kv"][layer_idx], q.data.view(torch.uint8))
            write(cache.blocks["kv_scale"][layer_idx], q.scale)
        else:
            write(cache.blocks["kv"][layer_idx], c_kv.reshape(B * T, r))
        write(cache.blocks["pe"][layer_idx], k_pe.reshape(B * T, dr))


def _static_blocks(pool: torch.Tensor, block_size: int) -> torch.Tensor:
    """pool [slots, w] seen as [slots / block_size, block_size, w], its sizes static under
    torch.compile (a view: writes through it land in pool)."""
    blocks = pool.view(-1, block_size, pool.shape[-1])
    torch._dynamo.mark_static(blocks)
    return blocks
